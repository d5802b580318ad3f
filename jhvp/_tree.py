"""Small pytree helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._typing import PyTree


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Returns the real inner product Σ_leaves <a, b> of two pytrees of one structure."""
    leaves = [
        jnp.vdot(x, y).real for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(leaves, start=jnp.zeros((), jnp.result_type(*leaves) if leaves else float))


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """Casts each leaf of `tree` to the dtype of the matching leaf of `like` (trace time only)."""
    return jax.tree.map(lambda t, p: jnp.asarray(t, dtype=jnp.result_type(p)), tree, like)
