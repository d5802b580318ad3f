"""What every jhvp operator shares: application, accepted tangent structures, dense form.

`HessianOperator`, `GGNOperator` and `FisherOperator` are frozen dataclasses registered as pytrees
with at least the data fields `value`, `grad` and `_apply` (a `jax.tree_util.Partial` mapping the
flat differentiated tangent leaves to the flat result leaves) and the meta field
`_tangent_layout`. They inherit everything else from `SymmetricOperator`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from . import _checks, _filter
from ._typing import PyTree


@dataclasses.dataclass(frozen=True)
class TangentLayout:
    """The accepted tangent structures: the gradient's, or the primals' own (statics ignored)."""

    diff_tree: Any
    full_tree: Any
    selection: tuple[int, ...]

    @staticmethod
    def of(layout: _filter.Layout, single: bool) -> TangentLayout:
        """Returns the layout of one cache entry's tangents."""
        diff_tree, full_tree = layout.tangent_trees[single]
        return TangentLayout(diff_tree, full_tree, layout.full_selection)


class SymmetricOperator:
    """A symmetric linear operator on the differentiated primals: `op(v)`, `op @ v`.

    A mixin for the registered dataclasses above; the subclass supplies the fields and, where
    true, `psd = True` (read by `jhvp.to_lineax` to add the positive-semidefinite tag).
    """

    psd: ClassVar[bool] = False
    value: jax.Array
    grad: PyTree
    _apply: Any
    _tangent_layout: TangentLayout

    def __call__(self, tangents: PyTree) -> PyTree:
        """Returns A·tangents, with the structure of the gradient."""
        return apply_jitted(self, self._tangent_leaves(tangents))

    def __matmul__(self, tangents: PyTree) -> PyTree:
        return apply_jitted(self, self._tangent_leaves(tangents))

    def _tangent_leaves(self, tangents: PyTree) -> list:
        leaves, tree = jax.tree.flatten(tangents)
        layout = self._tangent_layout
        if tree == layout.diff_tree:
            return leaves
        if tree == layout.full_tree:
            return [leaves[p] for p in layout.selection]
        _checks.check_tangents(self.grad, tangents, "tangents", type(self).__name__)
        raise AssertionError("unreachable: check_tangents accepted a rejected structure")

    def transpose(self) -> Any:
        """Returns the operator itself: it is symmetric."""
        return self

    @property
    def T(self) -> Any:  # noqa: N802 (numpy's name)
        """The transpose, which is the operator itself."""
        return self

    @property
    def shape(self) -> tuple[int, int]:
        """(n, n), n being the number of scalar parameters in the gradient."""
        n = sum(jnp.size(leaf) for leaf in jax.tree.leaves(self.grad))
        return (n, n)

    def in_structure(self) -> PyTree:
        """Returns the structure of the vectors it applies to: `jax.ShapeDtypeStruct` leaves.

        Examples:
            >>> import jax.numpy as jnp, jhvp
            >>> x = jnp.ones(3, dtype=jnp.float32)  # float32 with or without JAX_ENABLE_X64
            >>> op = jhvp.hessian_operator(lambda x: jnp.sum(x ** 4), (x,))
            >>> op.in_structure()
            ShapeDtypeStruct(shape=(3,), dtype=float32)
        """
        return jax.tree.map(lambda g: jax.ShapeDtypeStruct(jnp.shape(g), jnp.result_type(g)),
                            self.grad)

    def as_matrix(self) -> jax.Array:
        """Returns the dense n×n matrix, parameters ordered as `jax.flatten_util.ravel_pytree`.

        For small problems and tests only: it costs n applications (batched with `jax.vmap`, so
        n tangent passes at once) and n² memory.

        Examples:
            >>> import jax.numpy as jnp, jhvp
            >>> op = jhvp.hessian_operator(lambda p: p["a"] ** 2 * p["b"],
            ...                            ({"a": jnp.array(1.0), "b": jnp.array(3.0)},))
            >>> print(op.as_matrix())  # order: "a", "b"
            [[6. 2.]
             [2. 0.]]
        """
        flat, _ = ravel_pytree(self.grad)
        basis = jnp.eye(flat.size, dtype=flat.dtype)
        return _dense(self, basis)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.shape[0]}, value={self.value!r})"


def apply_traced(op: SymmetricOperator, vecs: list) -> PyTree:
    """A·v from flat tangent leaves, checked against the gradient and cast to its dtypes."""
    grads = jax.tree.leaves(op.grad)
    tree = jax.tree.structure(op.grad)
    for g, t in zip(grads, vecs, strict=True):
        if jnp.shape(g) != jnp.shape(t) or jnp.issubdtype(jnp.result_type(t), jnp.complexfloating):
            _checks.check_tangents(op.grad, tree.unflatten(vecs), "tangents", type(op).__name__)
    vecs = [jnp.asarray(t, dtype=jnp.result_type(g)) for g, t in zip(grads, vecs, strict=True)]
    return tree.unflatten(op._apply(vecs))


apply_jitted = jax.jit(apply_traced)


@jax.jit
def _dense(op: SymmetricOperator, basis: jax.Array) -> jax.Array:
    _, unravel = ravel_pytree(op.grad)
    return jax.vmap(
        lambda e: ravel_pytree(apply_traced(op, jax.tree.leaves(unravel(e))))[0]
    )(basis)
