"""Vectors with the operator's structure: the leaf-by-leaf algebra every algorithm runs on.

A vector is a pytree with the structure of the operator's input (`_protocol.TreeOperator`), all
leaves in its dtype; a *stack* of vectors (a Lanczos basis, a batch of probes, a sketch) is the
same pytree with leading axes on every leaf. Nothing is ever concatenated into one flat array:
a leaf keeps its shape, and so the sharding the parameters give it. Dot products, Gram matrices
and linear combinations run leaf by leaf and sum the leaves' contributions, and XLA inserts the
reductions across devices; only the small results (scalars, s × s matrices) are replicated.
New vectors (zeros, random starts, probes) are laid out with the structure's shardings where
they are known (`_protocol.named_sharding`); inside a user's `jax.jit` XLA propagates them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from .._protocol import TreeOperator
from .._typing import PyTree

# Dot products and reorthogonalisation must be exact to working precision: TF32 or bf16
# passes on accelerators (the default for float32 matmuls on some) would leave a basis
# orthogonal to 1e-3 only.
HIGHEST = jax.lax.Precision.HIGHEST


def constrain(op: TreeOperator, tree: PyTree, lead: int = 0) -> PyTree:
    """Lays out each leaf (with `lead` leading axes, replicated) like the structure's leaf."""

    def one(x, s):
        sharding = getattr(s, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return x
        spec = PartitionSpec(*([None] * lead), *sharding.spec)
        return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))

    return jax.tree.map(one, tree, op.struct)


def zeros(op: TreeOperator, lead: tuple[int, ...] = (), dtype: Any = None) -> PyTree:
    """A zero vector, or a zero stack with leading axes `lead`, laid out like the parameters."""
    dtype = op.dtype if dtype is None else dtype
    tree = jax.tree.map(lambda s: jnp.zeros((*lead, *s.shape), dtype), op.struct)
    return constrain(op, tree, len(lead))


def _leaf_keys(op: TreeOperator, key: jax.Array) -> PyTree:
    leaves, tree = jax.tree.flatten(op.struct)
    return jax.tree.unflatten(tree, [jax.random.fold_in(key, i) for i in range(len(leaves))])


def normal(op: TreeOperator, key: jax.Array, dtype: Any = None) -> PyTree:
    """A standard normal vector: leaf l drawn from `fold_in(key, l)`."""
    dtype = op.dtype if dtype is None else dtype
    tree = jax.tree.map(lambda k, s: jax.random.normal(k, s.shape, dtype),
                        _leaf_keys(op, key), op.struct)
    return constrain(op, tree)


def _signs(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    # One random 32-bit word gives 32 signs: 32x fewer random bits than
    # `jax.random.rademacher`, measured 11x slower for 99 probes of size 1e4. The words are
    # split into bytes and unpacked there, so what XLA may hold between unpacking and use is
    # one byte per sign, a quarter of a vector (a 32-bit word per sign was a whole vector per
    # probe in flight). The words run along the last axis, so the leading axes (where
    # parameters are usually sharded) stay.
    full = shape if shape else (1,)
    words = -(-full[-1] // 32)
    bits = jax.random.bits(key, (*full[:-1], words), jnp.uint32)
    octets = jax.lax.bitcast_convert_type(bits, jnp.uint8)  # (..., words, 4)
    shifts = jnp.arange(8, dtype=jnp.uint8).reshape((1,) * (len(full) + 1) + (8,))
    unpacked = (octets[..., None] >> shifts) & jnp.uint8(1)  # (..., words, 4, 8)
    signs = unpacked.reshape((*full[:-1], words * 32))[..., : full[-1]].reshape(shape)
    return jnp.asarray(1, dtype) - jnp.asarray(2, dtype) * signs.astype(dtype)


def rademacher(op: TreeOperator, key: jax.Array, i: Any, dtype: Any = None) -> PyTree:
    """Probe i: independent ±1 signs, leaf l drawn from `fold_in(fold_in(key, i), l)`.

    A function of `key` and `i` alone, so how probes are batched never changes them.
    """
    dtype = op.dtype if dtype is None else dtype
    tree = jax.tree.map(lambda k, s: _signs(k, s.shape, dtype),
                        _leaf_keys(op, jax.random.fold_in(key, i)), op.struct)
    return constrain(op, tree)


def _sum(parts: list, out: Any) -> jax.Array:
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total.astype(out)


def _contract(a: jax.Array, b: jax.Array, lead_a: int, lead_b: int, out: Any) -> jax.Array:
    """Contracts the trailing (vector) axes of a and b: result a's leading, then b's leading."""
    rest_a = tuple(range(lead_a, a.ndim))
    rest_b = tuple(range(lead_b, b.ndim))
    return jax.lax.dot_general(a, b.astype(a.dtype), ((rest_a, rest_b), ((), ())),
                               precision=HIGHEST, preferred_element_type=out)


def dot(a: PyTree, b: PyTree, out: Any) -> jax.Array:
    """aᵀb for two vectors, computed from a's dtype (b rounded to it), accumulated in `out`.

    A low-precision vector is exact to its own rounding only, so a float32 copy of it would
    cost memory and buy no accuracy.
    """
    return _sum(jax.tree.leaves(jax.tree.map(lambda x, y: _contract(x, y, 0, 0, out), a, b)),
                out)


def norm(a: PyTree, out: Any) -> jax.Array:
    """‖a‖, accumulated in `out`."""
    return jnp.sqrt(dot(a, a, out))


def coefficients(stack: PyTree, w: PyTree, out: Any) -> jax.Array:
    """(m,): the dot products of each vector of a stack (one leading axis) with w."""
    return _sum(jax.tree.leaves(jax.tree.map(lambda x, y: _contract(x, y, 1, 0, out), stack, w)),
                out)


def gram(a: PyTree, b: PyTree, out: Any) -> jax.Array:
    """(s, t): the dot products of the vectors of two stacks (one leading axis each)."""
    return _sum(jax.tree.leaves(jax.tree.map(lambda x, y: _contract(x, y, 1, 1, out), a, b)),
                out)


def row_dots(a: PyTree, b: PyTree, out: Any) -> jax.Array:
    """(s,): a_i·b_i for the vectors of two stacks of the same length."""

    def one(x, y):
        rest = tuple(range(1, x.ndim))
        return jax.lax.dot_general(x, y.astype(x.dtype), ((rest, rest), ((0,), (0,))),
                                   precision=HIGHEST, preferred_element_type=out)

    return _sum(jax.tree.leaves(jax.tree.map(one, a, b)), out)


def combine(c: jax.Array, stack: PyTree, out: Any) -> PyTree:
    """Σ_a c[..., a] stack[a]: a vector for c of shape (m,), a stack of k for c of shape (k, m)."""

    def one(x):
        return jax.lax.dot_general(c.astype(x.dtype), x, (((c.ndim - 1,), (0,)), ((), ())),
                                   precision=HIGHEST, preferred_element_type=out)

    return jax.tree.map(one, stack)


def scale_rows(stack: PyTree, c: jax.Array) -> PyTree:
    """Each vector stack[i] times c[i]."""
    return jax.tree.map(lambda x: x * jnp.asarray(c, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)),
                        stack)


def row(stack: PyTree, j: jax.Array) -> PyTree:
    """The vector stack[j] (j may be traced)."""
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, j, keepdims=False), stack)


def set_row(stack: PyTree, j: jax.Array, v: PyTree) -> PyTree:
    """The stack with row j replaced by v (cast to the stack's dtype): in place in a loop."""
    return jax.tree.map(
        lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y.astype(x.dtype), j, 0), stack, v)


def astype(tree: PyTree, dtype: Any) -> PyTree:
    """Every leaf cast to `dtype`."""
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def add(a: PyTree, b: PyTree) -> PyTree:
    """A + b."""
    return jax.tree.map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """A - b."""
    return jax.tree.map(jnp.subtract, a, b)


def scale(c: ArrayLike, a: PyTree) -> PyTree:
    """c·a for a scalar c (cast to each leaf's dtype)."""
    return jax.tree.map(lambda x: jnp.asarray(c, x.dtype) * x, a)


def axpy(c: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """c·x + y for a scalar c."""
    return jax.tree.map(lambda u, v: jnp.asarray(c, u.dtype) * u + v, x, y)


def where(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    """A where the scalar `pred` holds, else b."""
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def mul(a: PyTree, b: PyTree) -> PyTree:
    """The entrywise product a ⊙ b (broadcasting leading axes)."""
    return jax.tree.map(jnp.multiply, a, b)
