"""HessianOperator: linearize the gradient once, apply it to many vectors."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from . import _ad, _cache, _checks, _data, _filter, _protocol, _strategy
from ._protocol import SymmetricOperator, TangentLayout
from ._typing import STRATEGIES, PyTree, Reduction, Strategy


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["value", "grad", "_aux_arrays", "_apply"],
    meta_fields=["_tangent_layout", "_aux_static"],
)
@dataclasses.dataclass(frozen=True, repr=False)
class HessianOperator(SymmetricOperator):
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
    _tangent_layout: TangentLayout
    _aux_static: _filter.Static | None

    @property
    def aux(self) -> Any:
        """F's auxiliary output, exactly as f returned it (None without `has_aux`)."""
        if self._aux_static is None:
            return None
        return _cache.merge_aux((self._aux_arrays, self._aux_static))


def _apply_linearized(linear: Callable, vecs: list) -> list:
    return linear(vecs)[1]


def _apply_recompute(jaxpr, out_tree, consts: list, dynamic: list, vecs: list) -> list:
    # A traced program, not f itself: the operator must outlive the user's f without the jit
    # caches holding f alive, exactly as the linearized program does.
    flat = jax.core.eval_jaxpr(jaxpr, consts, *jax.tree.leaves((dynamic, vecs)))
    return jax.tree.unflatten(out_tree, flat)


def _body(t: _cache.Traced) -> HessianOperator:
    (strategy,) = t.key.extra

    def recompute(dynamic: list, vecs: list) -> list:
        # A program of its own, from the traced leaves: no closed-over tracer of this trace.
        again = t.again(dynamic)
        return _ad.guarded(_ad.fwd_rev, "fwd_rev", t.api, again.loss, again.diff, vecs)[1]

    value, grad, linear, aux = _ad.guarded(_ad.linearize, "fwd_rev", t.api, t.loss, t.diff)
    chosen = strategy
    if chosen == "auto":
        chosen = _strategy.choose(_apply_linearized, (linear, t.diff), recompute,
                                  (t.dynamic, t.diff))
    if chosen == "recompute":
        closed, out_shape = jax.make_jaxpr(recompute, return_shape=True)(t.dynamic, t.diff)
        body = functools.partial(_apply_recompute, closed.jaxpr, jax.tree.structure(out_shape))
        apply = jax.tree_util.Partial(body, closed.consts, t.dynamic)
    else:
        apply = jax.tree_util.Partial(_apply_linearized, linear)
    aux_arrays, aux_static = t.aux(aux) or (None, None)
    return HessianOperator(value, t.unflatten(grad), aux_arrays, apply,
                           TangentLayout.of(t.layout), aux_static)


def hessian_operator(
    f: Callable,
    primals: Sequence[Any],
    *,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    strategy: Strategy = "auto",
    wrt: Any = None,
    data: Any = None,
    reduction: Reduction = "mean",
    batch_size_fn: Callable | None = None,
    check_deterministic: bool = False,
) -> HessianOperator:
    """Returns the Hessian H = ∇²f(primals) as a `HessianOperator` that applies H·v.

    Linearizes the gradient once (`jax.linearize` of `jax.grad`, compiled and cached like `hvp`):
    the forward and reverse passes of f run now, and each later `op(v)` runs only the tangent
    pass over their stored residuals. Memory: the residuals of one reverse pass, kept alive as
    long as the operator is.

    Stored residuals pay off where f is compute-bound (matrix products: an application costs about
    0.75x a fresh `hvp` on an MLP). Where f is memory-bound (elementwise maths such as Rosenbrock),
    reading several residual arrays costs more than recomputing them from the primals (3.2x a fresh
    `hvp` at 10⁶ elements in the committed run). With `strategy="auto"` the operator asks XLA's cost
    model (flops and bytes of both compiled programs, once per input shape) which is cheaper and,
    for memory-bound f, keeps only the primals and runs a fresh forward-over-reverse pass per
    application. The cost model counts arithmetic and memory traffic, not kernel launches: on a GPU,
    problems small enough that a call is mostly launch overhead were measured up to 1.4x slower with
    stored residuals (an H100: a 500-parameter logistic regression, a 49k-parameter transformer
    block, in jhvp's GPU benchmark), so pass `strategy="recompute"` there.

    Args:
        f: A function returning a real scalar (or `(scalar, aux)` with `has_aux=True`).
        primals: A tuple of f's positional arguments, each any pytree.
        argnums: Which arguments are differentiated, as in `jax.grad`.
        has_aux: Whether f returns `(scalar, aux)`; aux is kept as `op.aux`.
        strategy: "auto" (default; see above), "linearize" (always store the residuals) or
            "recompute" (store the primals, recompute per application); one batch only (with
            `data` every application recomputes, and another strategy is an error).
        wrt: Which leaves are differentiated, as in `hvp` (NNX modules: `nnx.Param` only by
            default); the operator then acts on those leaves only (a Hessian block).
        data: A dataset: the operator is then the Hessian of the loss over all its batches,
            Σ_b w_b ∇²f(*primals, *batch_b), each batch appended to f's arguments, w_b = n_b/N
            (`reduction="mean"`) or 1 (`"sum"`); `value` and `grad` alike. `jhvp.batches(...)`
            keeps the data on the device (a pytree operator, one program per application);
            any re-iterable of batches (a list of tuples, a data loader) is streamed (a
            `jhvp.StreamedOperator`). Each application recomputes every batch's
            forward-over-reverse pass: memory is one batch's, whatever N. See `jhvp.batches`.
            A loss that couples a batch's examples (BatchNorm in training mode) is taken batch
            by batch, each with its own statistics: Σ_b w_b ∇²f_b depends on the batching and
            is not the Hessian of one pass over all N (in eval mode it is).
        reduction: "mean" (default) or "sum", with `data` only.
        batch_size_fn: batch -> its number of examples, for streamed batches whose first leaf
            does not have the examples along its leading axis (a dict batch); `data` only.
        check_deterministic: Apply the dataset operator twice at construction and raise if
            the products differ (augmentation, dropout, or shuffling where the loss depends on
            how examples are grouped); `data` only.

    Returns:
        A `HessianOperator` with `op(v)`, `op @ v`, `op.value`, `op.grad`, `op.aux` (a
        `jhvp.StreamedOperator` for streamed `data`).

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
    api = "hessian_operator"
    primals = _checks.check_primals(primals, f"jhvp.{api}")
    _checks.check_choice(strategy, STRATEGIES, "strategy", f"jhvp.{api}", plural="strategies")
    _data.check_options(data, api, primals, reduction=reduction, batch_size_fn=batch_size_fn,
                        check_deterministic=check_deterministic, has_aux=has_aux)
    if data is not None:
        if strategy != "auto":
            raise TypeError(
                f"jhvp.{api}: `strategy` applies to an operator of one batch; with `data`, "
                f"each application recomputes every batch's product (nothing is stored), so "
                f"strategy={strategy!r} cannot be honoured. Leave `strategy` at its default."
            )
        _checks.check_callable(f, f"jhvp.{api}")
        return _data.operator("hessian", api, (f,), (), primals, argnums, wrt, data, reduction,
                              batch_size_fn, check_deterministic)
    opts = _cache.options(api, len(primals), argnums, has_aux, "fwd_rev", (strategy,), wrt)
    return _protocol.placed(_cache.run(opts, f, primals, _body, shardings=True))


