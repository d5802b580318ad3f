"""HessianOperator: linearize the gradient once, apply it to many vectors."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from . import _ad, _call, _checks, _filter, _jit, _strategy
from ._typing import STRATEGIES, PyTree, Strategy


@dataclasses.dataclass(frozen=True)
class _TangentLayout:
    """The accepted tangent structures: the gradient's, or the primals' own (statics ignored)."""

    diff_tree: Any
    full_tree: Any
    selection: tuple[int, ...]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["value", "grad", "_aux_arrays", "_apply"],
    meta_fields=["_tangent_layout", "_aux_static"],
)
@dataclasses.dataclass(frozen=True)
class HessianOperator:
    """The Hessian H = ∇²f(primals) as a linear operator: `op(v)` and `op @ v` return H·v.

    Built by `hessian_operator`, which runs f's forward and reverse passes once and keeps their
    residuals (`jax.linearize` of the gradient). Each application then runs only the linear
    tangent pass: cheaper than a fresh `hvp` when many vectors are applied at one point (Krylov
    and CG solvers, Lanczos, power iteration), at the price of holding the residuals in memory,
    about what one reverse pass stores. For memory-bound f, where reading residuals costs more
    than recomputing them, it keeps the primals instead and each application is a fresh
    forward-over-reverse pass (see `hessian_operator`'s `strategy`). When every vector is known
    up front, `jax.vmap` of `hvp` over a stack of tangents needs no stored residuals.

    The operator is a pytree whose leaves are the value, the gradient, aux and the stored arrays,
    so it can be passed into a jitted function as an argument (closing over it instead would bake
    the arrays into the executable as constants). It composes with `jax.vmap` over tangents. It
    does not keep f alive: what it applies is a traced program, not f.

    Attributes:
        value: f(primals).
        grad: ∇f(primals), with the structure of the differentiated primals.
        aux: f's auxiliary output when built with `has_aux=True`, else None.

    Examples:
        >>> import jax, jax.numpy as jnp, jhvp
        >>> op = jhvp.hessian_operator(lambda x: jnp.sum(jnp.sin(x)), (jnp.full(3, jnp.pi / 2),))
        >>> op.shape
        (3, 3)
        >>> step = jax.jit(lambda op, v: op @ v)  # the operator is an argument, not a constant
        >>> print(step(op, jnp.ones(3)))  # H = diag(-sin x)
        [-1. -1. -1.]
    """

    value: jax.Array
    grad: PyTree
    _aux_arrays: list | None
    _apply: Callable
    _tangent_layout: _TangentLayout
    _aux_static: _filter.Static | None

    @property
    def aux(self) -> Any:
        """F's auxiliary output, exactly as f returned it (None without `has_aux`)."""
        if self._aux_static is None:
            return None
        return _call.merge_aux((self._aux_arrays, self._aux_static))

    def __call__(self, tangents: PyTree) -> PyTree:
        """Returns H·tangents, with the structure of the gradient."""
        return _apply_jitted(self, self._tangent_leaves(tangents))

    def __matmul__(self, tangents: PyTree) -> PyTree:
        return _apply_jitted(self, self._tangent_leaves(tangents))

    def _tangent_leaves(self, tangents: PyTree) -> list:
        leaves, tree = jax.tree.flatten(tangents)
        layout = self._tangent_layout
        if tree == layout.diff_tree:
            return leaves
        if tree == layout.full_tree:
            return [leaves[p] for p in layout.selection]
        _checks.check_tangents(self.grad, tangents, "tangents", "HessianOperator")
        raise AssertionError("unreachable: check_tangents accepted a rejected structure")

    def transpose(self) -> HessianOperator:
        """Returns the operator itself: a Hessian is symmetric."""
        return self

    @property
    def T(self) -> HessianOperator:  # noqa: N802 (numpy's name)
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
            >>> op = jhvp.hessian_operator(lambda x: jnp.sum(x ** 4), (jnp.ones(3),))
            >>> op.in_structure()
            ShapeDtypeStruct(shape=(3,), dtype=float32)
        """
        return jax.tree.map(lambda g: jax.ShapeDtypeStruct(jnp.shape(g), jnp.result_type(g)),
                            self.grad)

    def as_matrix(self) -> jax.Array:
        """Returns the dense n×n Hessian, parameters ordered as `jax.flatten_util.ravel_pytree`.

        For small problems and tests only: it costs n Hessian-vector products (batched with
        `jax.vmap`, so n tangent passes at once) and n² memory.

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
        n = self.shape[0]
        return f"HessianOperator(n={n}, value={self.value!r})"


def _apply_traced(op: HessianOperator, vecs: list) -> PyTree:
    grads = jax.tree.leaves(op.grad)
    tree = jax.tree.structure(op.grad)
    for g, t in zip(grads, vecs, strict=True):
        if jnp.shape(g) != jnp.shape(t) or jnp.issubdtype(jnp.result_type(t), jnp.complexfloating):
            _checks.check_tangents(op.grad, tree.unflatten(vecs), "tangents", "HessianOperator")
    vecs = [jnp.asarray(t, dtype=jnp.result_type(g)) for g, t in zip(grads, vecs, strict=True)]
    return tree.unflatten(op._apply(vecs))


_apply_jitted = jax.jit(_apply_traced)


@jax.jit
def _dense(op: HessianOperator, basis: jax.Array) -> jax.Array:
    _, unravel = ravel_pytree(op.grad)
    return jax.vmap(
        lambda e: ravel_pytree(_apply_traced(op, jax.tree.leaves(unravel(e))))[0]
    )(basis)


def _apply_linearized(linear: Callable, vecs: list) -> list:
    return linear(vecs)[1]


def _apply_recompute(jaxpr, out_tree, consts: list, dynamic: list, vecs: list) -> list:
    # A traced program, not f itself: the operator must outlive the user's f without the jit
    # caches holding f alive, exactly as the linearized program does.
    flat = jax.core.eval_jaxpr(jaxpr, consts, *jax.tree.leaves((dynamic, vecs)))
    return jax.tree.unflatten(out_tree, flat)


def _build(entry: _jit.Entry, key: _jit.CallKey) -> Callable:
    api = "hessian_operator"
    (strategy,) = key.extra
    layout = entry.layout
    diff_tree, full_tree = layout.tangent_trees[key.single]
    tangent_layout = _TangentLayout(diff_tree, full_tree, layout.full_selection)

    def recompute(dynamic: list, vecs: list) -> list:
        leaves = _call.traced_leaves(entry, dynamic)
        diff = _call.differentiated(entry, leaves, api)
        loss = _call.make_loss(entry, leaves, key.has_aux, api, [])
        return _ad.guarded(_ad.fwd_rev, "fwd_rev", api, loss, diff, vecs)[1]

    def program(dynamic: list) -> HessianOperator:
        leaves = _call.traced_leaves(entry, dynamic)
        diff = _call.differentiated(entry, leaves, api)
        box: list = []
        loss = _call.make_loss(entry, leaves, key.has_aux, api, box)
        value, grad, linear, aux = _ad.guarded(_ad.linearize, "fwd_rev", api, loss, diff)
        chosen = strategy
        if chosen == "auto":
            chosen = _strategy.choose(_apply_linearized, (linear, diff), recompute,
                                      (dynamic, diff))
        if chosen == "recompute":
            closed, out_shape = jax.make_jaxpr(recompute, return_shape=True)(dynamic, diff)
            body = functools.partial(_apply_recompute, closed.jaxpr,
                                     jax.tree.structure(out_shape))
            apply = jax.tree_util.Partial(body, closed.consts, dynamic)
        else:
            apply = jax.tree_util.Partial(_apply_linearized, linear)
        aux_arrays, aux_static = _call.aux_output(aux, box, key.has_aux) or (None, None)
        return HessianOperator(value, layout.unflatten_diff(grad, key.single), aux_arrays,
                               apply, tangent_layout, aux_static)

    program.__name__ = program.__qualname__ = f"jhvp_hessian_operator_{strategy}"
    return jax.jit(program)


def hessian_operator(
    f: Callable,
    primals: Sequence[Any],
    *,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    strategy: Strategy = "auto",
) -> HessianOperator:
    """Returns the Hessian H = ∇²f(primals) as a `HessianOperator` that applies H·v.

    Linearizes the gradient once (`jax.linearize` of `jax.grad`, compiled and cached like `hvp`):
    the forward and reverse passes of f run now, and each later `op(v)` runs only the tangent
    pass over their stored residuals. Memory: the residuals of one reverse pass, kept alive as
    long as the operator is.

    Stored residuals pay off where f is compute-bound (matrix products: an application costs
    about 0.75x a fresh `hvp` on an MLP). Where f is memory-bound (elementwise maths such as
    Rosenbrock), reading several residual arrays costs more than recomputing them from the
    primals, measured up to 4x slower. With `strategy="auto"` the operator asks XLA's cost model
    (flops and bytes of both compiled programs, once per input shape) which is cheaper and, for
    memory-bound f, keeps only the primals and runs a fresh forward-over-reverse pass per
    application. The cost model counts arithmetic and memory traffic, not kernel launches: on a
    GPU, problems small enough that a call is mostly launch overhead were measured up to 1.4x
    slower with stored residuals (an H100: a 500-parameter logistic regression, a 49k-parameter
    transformer block; `bench/RESULTS.md`), so pass `strategy="recompute"` there.

    Args:
        f: A function returning a real scalar (or `(scalar, aux)` with `has_aux=True`).
        primals: A tuple of f's positional arguments, each any pytree.
        argnums: Which arguments are differentiated, as in `jax.grad`.
        has_aux: Whether f returns `(scalar, aux)`; aux is kept as `op.aux`.
        strategy: "auto" (default; see above), "linearize" (always store the residuals) or
            "recompute" (store the primals, recompute per application).

    Returns:
        A `HessianOperator` with `op(v)`, `op @ v`, `op.value`, `op.grad`, `op.aux`.

    Raises:
        TypeError: As `hvp`.
        ValueError: As `hvp`; an unknown `strategy`; applying the operator to a vector of the
            wrong structure.

    Examples:
        >>> import jax, jax.numpy as jnp, jhvp
        >>> op = jhvp.hessian_operator(lambda x: jnp.sum(x ** 3), (jnp.array([1.0, 2.0]),))
        >>> print(op @ jnp.array([1.0, 1.0]))
        [ 6. 12.]
        >>> print(jax.vmap(op)(jnp.eye(2)))  # rows of H
        [[ 6.  0.]
         [ 0. 12.]]
        >>> print(op.value, op.grad)
        9.0 [ 3. 12.]
    """
    primals = _checks.check_primals(primals, "hessian_operator")
    _checks.check_choice(strategy, STRATEGIES, "strategy", "hessian_operator")
    key = _call.options("hessian_operator", len(primals), argnums, has_aux, "fwd_rev",
                        (strategy,))
    entry, leaves, dynamic = _call.prepare(f, primals, key, _build)
    return entry.call(leaves, dynamic)


