"""hvp, vhp and value_grad_hvp: argnums and has_aux plumbing, and the three AD routes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import jax

from . import _checks, _jit
from ._tree import cast_like
from ._typing import Mode, PyTree

# ----------------------------------------------------------------------------------------------
# Trace-time building blocks (shared with _operator.py).


def split_primals(primals: tuple, argnums: tuple[int, ...], api: str) -> tuple:
    """Returns the differentiated primals as a tuple, after checking their dtypes."""
    diff = tuple(primals[i] for i in argnums)
    _checks.check_differentiable(diff, argnums, api)
    return diff


def make_loss(f: Callable, primals: tuple, argnums: tuple[int, ...], has_aux: bool, api: str):
    """Returns `loss(d) -> (scalar, aux)`, f as a function of the differentiated primals `d`."""

    def loss(diff: tuple):
        args = list(primals)
        for i, x in zip(argnums, diff, strict=True):
            args[i] = x
        out = f(*args)
        value = _checks.check_scalar_output(out, has_aux, api)
        return value, (out[1] if has_aux else None)

    return loss


def _fwd_rev(loss, diff, tangents):
    # H·v as the directional derivative of the gradient: one forward pass over the reverse pass.
    _, hv, aux = jax.jvp(jax.grad(loss, has_aux=True), (diff,), (tangents,), has_aux=True)
    return hv, aux


def _rev_rev(loss, diff, cotangents):
    # vᵀH through the VJP of the gradient; equals H·v because H is symmetric.
    _, pullback, aux = jax.vjp(jax.grad(loss, has_aux=True), diff, has_aux=True)
    (vh,) = pullback(cotangents)
    return vh, aux


def _rev_fwd(loss, diff, tangents):
    # ∇ of the directional derivative <∇f, v>: reverse mode over one forward pass.
    def directional(d):
        _, dot, aux = jax.jvp(loss, (d,), (tangents,), has_aux=True)
        return dot, aux

    return jax.grad(directional, has_aux=True)(diff)


ROUTES = {"fwd_rev": _fwd_rev, "rev_rev": _rev_rev, "rev_fwd": _rev_fwd}


def guarded(route: Callable, mode: str, api: str, *args):
    """Runs an AD route, turning JAX's known AD failures into errors that say what to do."""
    try:
        return route(*args)
    except (ValueError, TypeError, NotImplementedError) as err:
        better = _checks.explain_ad_failure(err, mode, api)
        if better is None:
            raise
        raise better from err


# ----------------------------------------------------------------------------------------------
# Compiled, cached entry points.


def _build(get_f, kind: str, argnums: tuple[int, ...], single: bool, has_aux: bool, mode: str):
    api = kind
    name = "cotangents" if kind == "vhp" else "tangents"

    def impl(primals: tuple, vectors: PyTree):
        diff = split_primals(primals, argnums, api)
        _checks.check_tangents(diff[0] if single else diff, vectors, name, api)
        vecs = cast_like((vectors,) if single else tuple(vectors), diff)
        loss = make_loss(get_f(), primals, argnums, has_aux, api)
        if kind == "value_grad_hvp":
            value, grad, hv, aux = guarded(_value_grad_hvp, mode, api, loss, diff, vecs)
            unwrap = (lambda t: t[0]) if single else (lambda t: t)
            return ((value, aux) if has_aux else value), unwrap(grad), unwrap(hv)
        hv, aux = guarded(ROUTES[mode], mode, api, loss, diff, vecs)
        hv = hv[0] if single else hv
        return (hv, aux) if has_aux else hv

    impl.__name__ = impl.__qualname__ = f"jhvp_{kind}_{mode}"
    return jax.jit(impl)


def _value_grad_hvp(loss, diff, tangents):
    def value_and_grad(d):
        (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(d)
        return (value, grad), aux

    (value, grad), (_, hv), aux = jax.jvp(value_and_grad, (diff,), (tangents,), has_aux=True)
    return value, grad, hv, aux


def compiled(f, kind: str, n_primals: int, argnums: Any, has_aux: Any, mode: Any, builder=None):
    """Returns the cached jitted function for (f, kind, argnums, has_aux, mode, len(primals)).

    `builder(get_f, kind, argnums, single, has_aux, mode)` makes it on a miss (default: the
    vector-product kinds of this module).
    """
    if isinstance(argnums, list):
        argnums = tuple(argnums)
    key = (kind, n_primals, argnums, has_aux, mode)
    try:
        hash(key)
    except TypeError:
        _validate(f, kind, n_primals, argnums, has_aux, mode)
        raise

    def build(get_f):
        args = _validate(f, kind, n_primals, argnums, has_aux, mode)
        return (builder or _build)(get_f, kind, *args)

    return _jit.cached(f, key, build)


def _validate(f, kind, n_primals, argnums, has_aux, mode):
    kind = kind.split(":")[0]  # "hessian_operator:auto" -> the public name
    if not callable(f):
        raise TypeError(f"jhvp.{kind}: `f` must be callable, got {type(f).__name__}.")
    _checks.check_mode(mode, kind)
    has_aux = _checks.check_has_aux(has_aux, kind)
    single = not isinstance(argnums, tuple | list)
    return _checks.check_argnums(argnums, n_primals, kind), single, has_aux, mode


# ----------------------------------------------------------------------------------------------
# Public functions.


@overload
def hvp(
    f: Callable, primals: Sequence[Any], tangents: PyTree, *, argnums: int | Sequence[int] = 0,
    has_aux: Literal[False] = False, mode: Mode = "fwd_rev",
) -> PyTree: ...
@overload
def hvp(
    f: Callable, primals: Sequence[Any], tangents: PyTree, *, argnums: int | Sequence[int] = 0,
    has_aux: Literal[True], mode: Mode = "fwd_rev",
) -> tuple[PyTree, Any]: ...
def hvp(f, primals, tangents, *, argnums=0, has_aux=False, mode="fwd_rev"):
    """Computes H·v where H = ∇²f(primals), the Hessian with respect to the `argnums` arguments.

    Forward-over-reverse by default (`jax.jvp` of `jax.grad`): about the cost of two to three
    gradients and no more memory than one. The call is jit-compiled once per (f, argnums, has_aux,
    mode, input shapes/dtypes/shardings) and reused; inside `jax.jit`, `jax.vmap` or `jax.grad` it
    is an ordinary transformation.

    Args:
        f: A function of `len(primals)` positional arguments returning a real scalar, or a pair
            `(scalar, aux)` when `has_aux=True`.
        primals: A tuple of f's positional arguments, each any pytree of arrays.
        tangents: The vector v, with the structure of the differentiated primals (a single pytree
            for an int `argnums`, a tuple of pytrees for a tuple `argnums`).
        argnums: Which arguments are differentiated, as in `jax.grad`; the others are constants
            (data, a batch).
        has_aux: Whether f returns `(scalar, aux)`; aux comes back unchanged.
        mode: The AD route: "fwd_rev" (forward-over-reverse, the fastest), "rev_rev"
            (reverse-over-reverse, the most memory) or "rev_fwd" (reverse-over-forward).

    Returns:
        H·v with the structure of `tangents`; `(hv, aux)` when `has_aux=True`.

    Raises:
        TypeError: `primals` is not a tuple or list; f's output is not a real scalar; a
            differentiated primal has integer leaves.
        ValueError: `tangents` does not match the differentiated primals (the first mismatching
            leaf path is named); `argnums` is out of range; `mode` is unknown; f has a
            `lax.while_loop`, which reverse mode cannot differentiate.

    Examples:
        >>> import jax.numpy as jnp, jhvp
        >>> f = lambda p: jnp.sum(p["w"] ** 3) + p["b"] ** 2
        >>> p = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> v = {"w": jnp.array([1.0, 1.0]), "b": jnp.array(1.0)}
        >>> hv = jhvp.hvp(f, (p,), v)
        >>> print(hv["w"], hv["b"])  # H = diag(6w, 2)
        [ 6. 12.] 2.0
    """
    primals = _checks.check_primals(primals, "hvp")
    return compiled(f, "hvp", len(primals), argnums, has_aux, mode)(primals, tangents)


@overload
def vhp(
    f: Callable, primals: Sequence[Any], cotangents: PyTree, *,
    argnums: int | Sequence[int] = 0, has_aux: Literal[False] = False,
) -> PyTree: ...
@overload
def vhp(
    f: Callable, primals: Sequence[Any], cotangents: PyTree, *,
    argnums: int | Sequence[int] = 0, has_aux: Literal[True],
) -> tuple[PyTree, Any]: ...
def vhp(f, primals, cotangents, *, argnums=0, has_aux=False):
    """Computes vᵀH where H = ∇²f(primals), by reverse-over-reverse differentiation.

    Equal to `hvp` because H is symmetric, and provided for code that thinks in cotangents (and
    to mirror `torch.autograd.functional.vhp`). In JAX forward-over-reverse (`hvp`) is the faster
    route and keeps less memory: the reverse-over-reverse route stores the whole first reverse
    pass for the second one.

    Args:
        f: A function returning a real scalar (or `(scalar, aux)` with `has_aux=True`).
        primals: A tuple of f's positional arguments, each any pytree.
        cotangents: The vector v, with the structure of the differentiated primals.
        argnums: Which arguments are differentiated, as in `jax.grad`.
        has_aux: Whether f returns `(scalar, aux)`.

    Returns:
        vᵀH with the structure of `cotangents`; `(vh, aux)` when `has_aux=True`.

    Raises:
        TypeError: As `hvp`.
        ValueError: As `hvp`.

    Examples:
        >>> import jax.numpy as jnp, jhvp
        >>> x, v = jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0])
        >>> print(jhvp.vhp(lambda x: jnp.sum(x ** 3), (x,), v))
        [6. 0.]
    """
    primals = _checks.check_primals(primals, "vhp")
    return compiled(f, "vhp", len(primals), argnums, has_aux, "rev_rev")(primals, cotangents)


@overload
def value_grad_hvp(
    f: Callable, primals: Sequence[Any], tangents: PyTree, *,
    argnums: int | Sequence[int] = 0, has_aux: Literal[False] = False,
) -> tuple[jax.Array, PyTree, PyTree]: ...
@overload
def value_grad_hvp(
    f: Callable, primals: Sequence[Any], tangents: PyTree, *,
    argnums: int | Sequence[int] = 0, has_aux: Literal[True],
) -> tuple[tuple[jax.Array, Any], PyTree, PyTree]: ...
def value_grad_hvp(f, primals, tangents, *, argnums=0, has_aux=False):
    """Computes f(primals), ∇f(primals) and H·v together, in one forward-over-reverse pass.

    The value and the gradient are by-products of the pass that forms H·v, so a Newton-type step
    that needs all three pays for one HVP, not one HVP plus one gradient.

    Args:
        f: A function returning a real scalar (or `(scalar, aux)` with `has_aux=True`).
        primals: A tuple of f's positional arguments, each any pytree.
        tangents: The vector v, with the structure of the differentiated primals.
        argnums: Which arguments are differentiated, as in `jax.grad`.
        has_aux: Whether f returns `(scalar, aux)`.

    Returns:
        `(value, grad, hv)`; with `has_aux=True`, `((value, aux), grad, hv)`.

    Raises:
        TypeError: As `hvp`.
        ValueError: As `hvp`.

    Examples:
        >>> import jax.numpy as jnp, jhvp
        >>> value, grad, hv = jhvp.value_grad_hvp(
        ...     lambda x: jnp.sum(x ** 3), (jnp.array([1.0, 2.0]),), jnp.array([1.0, 1.0]))
        >>> print(value, grad, hv)
        9.0 [ 3. 12.] [ 6. 12.]
    """
    primals = _checks.check_primals(primals, "value_grad_hvp")
    fn = compiled(f, "value_grad_hvp", len(primals), argnums, has_aux, "fwd_rev")
    return fn(primals, tangents)
