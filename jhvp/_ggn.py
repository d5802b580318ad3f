"""Gauss-Newton curvature: the GGN Jᵀ(∇²ℓ)J and the empirical Fisher (1/N)JᵀJ as operators.

Both linearize the model once (`jax.linearize`: J is never formed) and apply J with the stored
residuals, then Jᵀ with `jax.linear_transpose` of that same linearization, so one set of
residuals serves both directions. Reference: Schraudolph, "Fast curvature matrix-vector products
for second-order gradient descent" (Neural Computation, 2002); Martens, "New insights and
perspectives on the natural gradient method" (JMLR, 2020), for the empirical Fisher's caveats.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from . import _ad, _cache, _checks, _data, _filter, _protocol
from ._protocol import SymmetricOperator, TangentLayout
from ._typing import PyTree, Reduction

# value, grad and the application's arrays are traced; the tangent layout is static.
_register = functools.partial(jax.tree_util.register_dataclass,
                              data_fields=["value", "grad", "_apply"],
                              meta_fields=["_tangent_layout"])


@_register
@dataclasses.dataclass(frozen=True, repr=False)
class GGNOperator(SymmetricOperator):
    """The generalised Gauss-Newton matrix G = Jᵀ (∇²_z L) J as a linear operator: `op(v)` = G·v.

    z = model(*primals), L = loss(z, *loss_args), J = ∂z/∂(differentiated primals). Built by
    `ggn_operator`. Each application is one Jacobian-vector product over the model's stored
    linearization residuals, one product with the loss Hessian at z (stored too: z is small),
    and one transposed product over the same residuals. It has the protocol of
    `HessianOperator` (`op @ v`, `jax.vmap(op)`, `shape`, `in_structure()`, `as_matrix()`, a
    pytree to pass into jitted functions) and declares `psd = True`: G is positive
    semidefinite wherever the loss is convex in z.

    Attributes:
        value: L = loss(model(*primals), *loss_args).
        grad: ∇L, with the structure of the differentiated primals.

    Examples:
        >>> import jax.numpy as jnp, jhvp
        >>> op = jhvp.ggn_operator(lambda w: jnp.tanh(w), lambda z: jnp.sum(z ** 2),
        ...                        (jnp.zeros(2),))
        >>> print(op @ jnp.array([1.0, 2.0]), type(op).psd)  # J = I at 0, ∇²L = 2 I
        [2. 4.] True
    """

    psd = True
    value: jax.Array
    grad: PyTree
    _apply: Callable
    _tangent_layout: TangentLayout


@_register
@dataclasses.dataclass(frozen=True, repr=False)
class FisherOperator(SymmetricOperator):
    """The empirical Fisher F = (1/N) JᵀJ as a linear operator: `op(v)` = F·v.

    J = ∂ℓ/∂(differentiated primals) is the N×P Jacobian of the N per-example losses ℓ. Built
    by `empirical_fisher_operator`. Each application is one Jacobian-vector product and one
    transposed product over the stored linearization residuals; per-example gradients are never
    formed. The protocol is `HessianOperator`'s; `psd = True`.

    Attributes:
        value: mean(ℓ).
        grad: ∇ mean(ℓ), with the structure of the differentiated primals.

    Examples:
        >>> import jax.numpy as jnp, jhvp
        >>> op = jhvp.empirical_fisher_operator(lambda w: w * jnp.array([1.0, 2.0]),
        ...                                     (jnp.zeros(2),))
        >>> print(op.as_matrix())  # J = diag(1, 2), N = 2
        [[0.5 0. ]
         [0.  2. ]]
    """

    psd = True
    value: jax.Array
    grad: PyTree
    _apply: Callable
    _tangent_layout: TangentLayout


def _apply_gauss_newton(linear: Callable, curvature: Callable, vecs: list) -> list:
    """Jᵀ C J v: J over the stored residuals, C the output-space curvature, then Jᵀ over them."""
    (out,) = jax.linear_transpose(linear, vecs)(curvature(linear(vecs)))
    return out


def _mean_weight(u: jax.Array) -> jax.Array:
    return u / u.shape[0]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["model", "loss", "loss_args"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _GaussNewtonProblem:
    """L = loss(model(*primals), *loss_args), with its parts named: what `ggn_operator` caches.

    A pytree like any f: the model's and loss_args' arrays are traced, the callables static.
    """

    model: Callable
    loss: Callable
    loss_args: tuple

    def __call__(self, *primals: Any) -> Any:
        return self.loss(self.model(*primals), *self.loss_args)


def _check_outputs(z: PyTree, api: str) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(z)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"{api}: the model's outputs must be real floating point, but "
                f"output{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}. Return "
                "integer results (labels, counts) outside the model, e.g. in `loss_args`."
            )


def _check_loss(out: Any, api: str) -> Any:
    shape = jnp.shape(out) if hasattr(out, "shape") or isinstance(out, float | int) else None
    if shape != ():
        got = f"an array of shape {shape}" if shape is not None else type(out).__name__
        raise TypeError(
            f"{api}: `loss(model(*primals), *loss_args)` must return a real scalar, got "
            f"{got}. Reduce it to a scalar (e.g. `.mean()` over the batch)."
        )
    if not jnp.issubdtype(jnp.result_type(out), jnp.floating):
        raise TypeError(
            f"{api}: `loss` must return a real floating-point scalar, got dtype "
            f"{jnp.result_type(out)}."
        )
    return out


def _check_per_example(out: Any, api: str) -> jax.Array:
    shape = jnp.shape(out) if hasattr(out, "shape") else None
    if shape is None or len(shape) != 1 or not jnp.issubdtype(jnp.result_type(out),
                                                                jnp.floating):
        got = (f"an array of shape {shape} and dtype {jnp.result_type(out)}"
               if shape is not None else type(out).__name__)
        raise TypeError(
            f"{api}: `per_example_loss` must return a 1-D floating-point vector of N "
            f"per-example losses, got {got}. Flatten a batch of losses with `.reshape(-1)`; "
            "for a scalar loss use `jhvp.hessian_operator` or `jhvp.ggn_operator`."
        )
    if shape[0] == 0:
        raise ValueError(f"{api}: `per_example_loss` returned no losses (N = 0).")
    return out


def _ggn_body(t: _cache.Traced) -> GGNOperator:
    def model_of(d: list) -> PyTree:
        problem, primals = t.substitute(d)
        return problem.model(*primals)

    problem, _ = t.substitute(t.diff)

    def loss_grad(z: PyTree):
        value, gz = jax.value_and_grad(
            lambda z: _check_loss(problem.loss(z, *problem.loss_args), t.api))(z)
        return gz, value

    def parts():
        z, linear = jax.linearize(model_of, t.diff)
        _check_outputs(z, t.api)
        gz, loss_linear, value = jax.linearize(loss_grad, z, has_aux=True)
        (grad,) = jax.linear_transpose(linear, t.diff)(gz)
        return value, grad, jax.tree_util.Partial(_apply_gauss_newton, linear, loss_linear)

    value, grad, apply = _ad.guarded(parts, "fwd_rev", t.api)
    return GGNOperator(value, t.unflatten(grad), apply, TangentLayout.of(t.layout))


def _fisher_body(t: _cache.Traced) -> FisherOperator:
    def losses(d: list) -> jax.Array:
        f, primals = t.substitute(d)
        return _check_per_example(f(*primals), t.api)

    def parts():
        ell, linear = jax.linearize(losses, t.diff)
        weights = jnp.full(ell.shape, 1.0 / ell.shape[0], ell.dtype)
        (grad,) = jax.linear_transpose(linear, t.diff)(weights)
        apply = jax.tree_util.Partial(_apply_gauss_newton, linear,
                                      jax.tree_util.Partial(_mean_weight))
        return jnp.mean(ell), grad, apply

    value, grad, apply = _ad.guarded(parts, "fwd_rev", t.api)
    return FisherOperator(value, t.unflatten(grad), apply, TangentLayout.of(t.layout))


def _callable(fn: Any, name: str, api: str) -> Callable:
    _checks.check_callable(fn, api, name=name)
    return _filter.as_pytree_callable(fn)


def ggn_operator(
    model: Callable[..., PyTree],
    loss: Callable[..., Any],
    primals: Sequence[Any],
    *,
    argnums: int | Sequence[int] = 0,
    loss_args: Sequence[Any] = (),
    wrt: Any = None,
    data: Any = None,
    reduction: Reduction = "mean",
    batch_size_fn: Callable | None = None,
    check_deterministic: bool = False,
) -> GGNOperator:
    """Returns the generalised Gauss-Newton matrix G = Jᵀ (∇²_z L) J as a `GGNOperator`.

    z = model(*primals) (any pytree of outputs), L = loss(z, *loss_args) a real scalar, and J the
    Jacobian of z with respect to the `argnums` primals. G drops the second-order terms of the
    model from the Hessian of L(model(θ)): it equals H for a linear model, and is positive
    semidefinite wherever the loss is convex in z (squared error, softmax cross-entropy).

    The model is linearized once (`jax.linearize`, compiled and cached like `hessian_operator`):
    J is never formed. Each application G·v then costs one Jacobian-vector product over the
    model's stored residuals, one loss-Hessian product on z (its residuals are stored too; z is
    batch × outputs, small) and one vector-Jacobian product over the same residuals: cheaper than
    an H·v, which also differentiates the model's backward pass. Memory: the model's
    linearization residuals, kept alive as long as the operator is.

    Args:
        model: A function of `len(primals)` positional arguments returning any pytree of real
            floating-point arrays. An Equinox or Flax module may be a primal (`lambda m, x: m(x)`).
        loss: `loss(z, *loss_args)`, a real scalar; it should be convex in z for G to be PSD.
        primals: A tuple of model's positional arguments, each any pytree.
        argnums: Which arguments are differentiated, as in `jax.grad`; the others are constants
            (data, a batch).
        loss_args: Extra positional arguments of `loss` (targets): arrays are traced, other
            leaves static.
        wrt: Which leaves of the differentiated primals are differentiated, as in `jhvp.hvp`.
        data: A dataset of batches (x, *rest): the operator is then Σ_b w_b G_b, G_b the GGN of
            loss(model(*primals, x_b), *rest_b, *loss_args), w_b = n_b/N (`reduction="mean"`)
            or 1 (`"sum"`), as in `hessian_operator`; `jhvp.batches(x, y, batch_size=B)` on the
            device, a re-iterable of (x, y) batches streamed.
        reduction: "mean" (default) or "sum", with `data` only.
        batch_size_fn: batch -> its number of examples (streamed dict batches); `data` only.
        check_deterministic: Apply the operator twice at construction and raise if the
            products differ; `data` only.

    Returns:
        A `GGNOperator` with `op(v)`, `op @ v`, `op.value` (L) and `op.grad` (∇L) (a
        `jhvp.StreamedOperator` for streamed `data`).

    Raises:
        TypeError: `model` or `loss` is not callable; `primals` or `loss_args` is not a tuple or
            list; the loss is not a real scalar; a model output or a differentiated primal is
            not floating point.
        ValueError: As `hessian_operator`; applying the operator to a vector of the wrong
            structure.

    Examples:
        >>> import jax, jax.numpy as jnp, jhvp
        >>> model = lambda w, x: x @ w
        >>> loss = lambda z, y: jnp.mean((z - y) ** 2)
        >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.zeros(2)
        >>> op = jhvp.ggn_operator(model, loss, (jnp.ones(2), x), loss_args=(y,))
        >>> print(op.as_matrix())  # a linear model: G = H = 2 XᵀX / N
        [[1. 0.]
         [0. 4.]]
        >>> print(op @ jnp.array([1.0, 1.0]), op.value, op.grad)
        [1. 4.] 2.5 [1. 4.]
        >>> print(jax.vmap(op)(jnp.eye(2)))
        [[1. 0.]
         [0. 4.]]
    """
    api = "ggn_operator"
    model = _callable(model, "model", f"jhvp.{api}")
    loss = _callable(loss, "loss", f"jhvp.{api}")
    primals = _checks.check_primals(primals, f"jhvp.{api}")
    if not isinstance(loss_args, tuple | list):
        raise TypeError(
            f"jhvp.{api}: `loss_args` must be a tuple (or list) of loss's extra positional "
            f"arguments, got {type(loss_args).__name__}. For one target y, pass `loss_args=(y,)`."
        )
    _data.check_options(data, api, primals, reduction=reduction, batch_size_fn=batch_size_fn,
                        check_deterministic=check_deterministic)
    if data is not None:
        return _data.operator("ggn", api, (model, loss), tuple(loss_args), primals, argnums,
                              wrt, data, reduction, batch_size_fn, check_deterministic)
    opts = _cache.options(api, len(primals), argnums, False, wrt=wrt)
    problem = _GaussNewtonProblem(model, loss, tuple(loss_args))
    return _protocol.placed(_cache.run(opts, problem, primals, _ggn_body, shardings=True))


def empirical_fisher_operator(
    per_example_loss: Callable[..., jax.Array],
    primals: Sequence[Any],
    *,
    argnums: int | Sequence[int] = 0,
    wrt: Any = None,
    data: Any = None,
    reduction: Reduction = "mean",
    batch_size_fn: Callable | None = None,
    check_deterministic: bool = False,
) -> FisherOperator:
    """Returns the empirical Fisher F = (1/N) JᵀJ, J = ∂ℓ/∂θ, as a `FisherOperator`.

    ℓ = per_example_loss(*primals) is a vector of N per-example losses and θ the `argnums`
    primals; F is the mean outer product of the per-example gradients. It is not the Fisher
    information (that takes expectations under the model's own predictive distribution) and
    only approximates the Hessian near a good fit; see Kunstner et al., "Limitations of the
    empirical Fisher approximation" (NeurIPS 2019).

    The per-example loss is linearized once (`jax.linearize`, compiled and cached): neither J
    nor the per-example gradients are formed. Each application F·v costs one Jacobian-vector
    product and one vector-Jacobian product over the stored residuals, about one gradient's
    work. Memory: the linearization residuals, kept alive as long as the operator is.

    Args:
        per_example_loss: A function of `len(primals)` positional arguments returning a 1-D
            real vector of N per-example losses (e.g. `jax.vmap` of a one-example loss).
        primals: A tuple of its positional arguments, each any pytree.
        argnums: Which arguments are differentiated, as in `jax.grad`.
        wrt: Which leaves of the differentiated primals are differentiated, as in `jhvp.hvp`.
        data: A dataset: per_example_loss(*primals, *batch_b) gives batch b's losses, and the
            operator is (1/N) Σᵢ ∇ℓᵢ∇ℓᵢᵀ over all N examples (`reduction="mean"`) or
            Σᵢ ∇ℓᵢ∇ℓᵢᵀ (`"sum"`), value mean or sum of ℓ; on the device or streamed, as in
            `hessian_operator`.
        reduction: "mean" (default) or "sum", with `data` only.
        batch_size_fn: batch -> its number of examples (streamed dict batches); `data` only.
        check_deterministic: Apply the operator twice at construction and raise if the
            products differ; `data` only.

    Returns:
        A `FisherOperator` with `op(v)`, `op @ v`, `op.value` (mean ℓ) and `op.grad` (∇ mean ℓ)
        (a `jhvp.StreamedOperator` for streamed `data`).

    Raises:
        TypeError: `per_example_loss` is not callable or does not return a 1-D floating-point
            vector; as `hessian_operator` for the primals.
        ValueError: It returns no losses (N = 0); as `hessian_operator`; applying the operator
            to a vector of the wrong structure.

    Examples:
        >>> import jax.numpy as jnp, jhvp
        >>> losses = lambda w, x, y: (x @ w - y) ** 2  # one squared error per example
        >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.zeros(2)
        >>> op = jhvp.empirical_fisher_operator(losses, (jnp.ones(2), x, y))
        >>> print(op.as_matrix())  # rows of J: 2 r_i x_i = [2, 0] and [0, 8]
        [[ 2.  0.]
         [ 0. 32.]]
        >>> print(op.value, op.grad)
        2.5 [1. 4.]
    """
    api = "empirical_fisher_operator"
    per_example_loss = _callable(per_example_loss, "per_example_loss", f"jhvp.{api}")
    primals = _checks.check_primals(primals, f"jhvp.{api}")
    _data.check_options(data, api, primals, reduction=reduction, batch_size_fn=batch_size_fn,
                        check_deterministic=check_deterministic)
    if data is not None:
        return _data.operator("fisher", api, (per_example_loss,), (), primals, argnums, wrt,
                              data, reduction, batch_size_fn, check_deterministic)
    opts = _cache.options(api, len(primals), argnums, False, wrt=wrt)
    return _protocol.placed(_cache.run(opts, per_example_loss, primals, _fisher_body,
                                       shardings=True))
