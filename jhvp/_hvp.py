"""The public hvp, vhp and value_grad_hvp: each picks an AD route and shapes its result."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import jax

from . import _ad, _cache, _checks
from ._typing import Mode, PyTree


def _product_body(t: _cache.Traced) -> tuple:
    key = t.key
    _, hv, aux = _ad.guarded(_ad.ROUTES[key.mode], key.mode, t.api, t.loss, t.diff, t.vecs)
    return t.unflatten(hv), t.aux(aux)


def _value_grad_hvp_body(t: _cache.Traced) -> tuple:
    value, grad, hv, aux = _ad.guarded(_ad.value_grad_hvp, "fwd_rev", t.api, t.loss, t.diff,
                                       t.vecs)
    return value, t.unflatten(grad), t.unflatten(hv), t.aux(aux)


def _product(api: str, f, primals, vectors, argnums, has_aux, mode, wrt, body=_product_body,
             name="tangents"):
    if type(primals) is not tuple:
        primals = _checks.check_primals(primals, f"jhvp.{api}")
    opts = _cache.options(api, len(primals), argnums, has_aux, mode, wrt=wrt)
    return _cache.run(opts, f, primals, body, vectors, name)


@overload
def hvp(
    f: Callable, primals: Sequence[Any], tangents: PyTree, *, argnums: int | Sequence[int] = 0,
    has_aux: Literal[False] = False, mode: Mode = "fwd_rev", wrt: Any = None,
) -> PyTree: ...
@overload
def hvp(
    f: Callable, primals: Sequence[Any], tangents: PyTree, *, argnums: int | Sequence[int] = 0,
    has_aux: Literal[True], mode: Mode = "fwd_rev", wrt: Any = None,
) -> tuple[PyTree, Any]: ...
def hvp(
    f: Callable, primals: Sequence[Any], tangents: PyTree, *, argnums: int | Sequence[int] = 0,
    has_aux: bool = False, mode: Mode = "fwd_rev", wrt: Any = None,
) -> PyTree | tuple[PyTree, Any]:
    """Computes H·v where H = ∇²f(primals), the Hessian with respect to the `argnums` arguments.

    Forward-over-reverse by default (`jax.jvp` of `jax.grad`): 1.1-2.7 gradients' time and
    1.2-1.5 times a gradient's peak memory in the committed CPU runs. The call is jit-compiled
    once per (f, argnums, has_aux, mode, structure, static leaves, input shapes, dtypes and
    shardings) and reused;
    inside `jax.jit`, `jax.vmap` or `jax.grad` it is an ordinary transformation.

    Leaves follow the Equinox convention. In the differentiated primals, floating-point arrays
    and Python floats are differentiated and every other leaf (callables, None, strings, ints) is
    held fixed, so an Equinox or Flax model is passed as it is. In the other primals, arrays are
    traced and every other leaf is static (part of the compile key, never traced).

    Args:
        f: A function of `len(primals)` positional arguments returning a real scalar, or a pair
            `(scalar, aux)` when `has_aux=True`. A pytree f (a `jax.tree_util.Partial`, an
            Equinox module, a bound method of a registered pytree) passes its arrays as
            arguments, so new values are seen without a new trace. A plain closure or a bound
            method of a plain object is a compile-time constant, as under `jax.jit`: what it
            reads is fixed when first traced; pass such state as an argument instead.
        primals: A tuple of f's positional arguments, each any pytree.
        tangents: The vector v, with the structure of the differentiated primals: arrays at the
            differentiated leaves and None elsewhere (a single pytree for an int `argnums`, a
            tuple of pytrees for a tuple `argnums`); the primals' own structure, static leaves
            repeated, is accepted too, and for an NNX module an `nnx.State` of the
            differentiated variables (what `nnx.grad` returns).
        argnums: Which arguments are differentiated, as in `jax.grad`; the others are constants
            (data, a batch).
        has_aux: Whether f returns `(scalar, aux)`; aux comes back exactly as f returned it.
        mode: The AD route: "fwd_rev" (forward-over-reverse; fastest or tied in the committed
            benchmark runs), "rev_rev" (reverse-over-reverse) or "rev_fwd"
            (reverse-over-forward).
        wrt: Which leaves of the differentiated arguments are differentiated: a pytree
            prefix of bools (`{"w": True, "b": False}`: the Hessian block of w), a callable on
            a leaf (`eqx.is_inexact_array`), or an NNX filter (`nnx.Param`); a tuple of them
            for a tuple `argnums`. Default: every floating-point leaf, but only `nnx.Param`
            in a Flax NNX module and only "params" in a linen `{"params", "batch_stats"}`
            dict, as those frameworks' own `grad` do.

    Returns:
        H·v in the gradient's structure (arrays at the differentiated leaves, None elsewhere),
        or an `nnx.State` like `tangents` when `tangents` is one; `(hv, aux)` when
        `has_aux=True`.

    Raises:
        TypeError: `primals` is not a tuple or list; f's output is not a real scalar; a
            differentiated primal has integer, boolean or complex arrays; `argnums` is not an
            int or tuple of ints; `has_aux` is not a bool.
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
    hv, aux = _product("hvp", f, primals, tangents, argnums, has_aux, mode, wrt)
    return hv if aux is None else (hv, _cache.merge_aux(aux))


@overload
def vhp(
    f: Callable, primals: Sequence[Any], cotangents: PyTree, *,
    argnums: int | Sequence[int] = 0, has_aux: Literal[False] = False, wrt: Any = None,
) -> PyTree: ...
@overload
def vhp(
    f: Callable, primals: Sequence[Any], cotangents: PyTree, *,
    argnums: int | Sequence[int] = 0, has_aux: Literal[True], wrt: Any = None,
) -> tuple[PyTree, Any]: ...
def vhp(
    f: Callable, primals: Sequence[Any], cotangents: PyTree, *,
    argnums: int | Sequence[int] = 0, has_aux: bool = False, wrt: Any = None,
) -> PyTree | tuple[PyTree, Any]:
    """Computes vᵀH where H = ∇²f(primals), by reverse-over-reverse differentiation.

    Equal to `hvp` because H is symmetric, and provided for code that thinks in cotangents (and
    to mirror `torch.autograd.functional.vhp`). In the committed benchmark runs
    forward-over-reverse (`hvp`) was as fast or faster (up to 1.34x on transformer blocks) at
    about the same peak memory.

    Args:
        f: A function returning a real scalar (or `(scalar, aux)` with `has_aux=True`).
        primals: A tuple of f's positional arguments, each any pytree.
        cotangents: The vector v, with the structure of the differentiated primals.
        argnums: Which arguments are differentiated, as in `jax.grad`.
        has_aux: Whether f returns `(scalar, aux)`.
        wrt: Which leaves are differentiated, as in `hvp`.

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
    vh, aux = _product("vhp", f, primals, cotangents, argnums, has_aux, "rev_rev", wrt,
                       name="cotangents")
    return vh if aux is None else (vh, _cache.merge_aux(aux))


@overload
def value_grad_hvp(
    f: Callable, primals: Sequence[Any], tangents: PyTree, *,
    argnums: int | Sequence[int] = 0, has_aux: Literal[False] = False, wrt: Any = None,
) -> tuple[jax.Array, PyTree, PyTree]: ...
@overload
def value_grad_hvp(
    f: Callable, primals: Sequence[Any], tangents: PyTree, *,
    argnums: int | Sequence[int] = 0, has_aux: Literal[True], wrt: Any = None,
) -> tuple[tuple[jax.Array, Any], PyTree, PyTree]: ...
def value_grad_hvp(
    f: Callable, primals: Sequence[Any], tangents: PyTree, *, argnums: int | Sequence[int] = 0,
    has_aux: bool = False, wrt: Any = None,
) -> tuple[jax.Array | tuple[jax.Array, Any], PyTree, PyTree]:
    """Computes f(primals), ∇f(primals) and H·v together, in one forward-over-reverse pass.

    The value and the gradient are by-products of the pass that forms H·v, so a Newton-type step
    that needs all three pays for one HVP, not one HVP plus one gradient.

    Args:
        f: A function returning a real scalar (or `(scalar, aux)` with `has_aux=True`).
        primals: A tuple of f's positional arguments, each any pytree.
        tangents: The vector v, with the structure of the differentiated primals.
        argnums: Which arguments are differentiated, as in `jax.grad`.
        has_aux: Whether f returns `(scalar, aux)`.
        wrt: Which leaves are differentiated, as in `hvp`.

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
    value, grad, hv, aux = _product("value_grad_hvp", f, primals, tangents, argnums, has_aux,
                                    "fwd_rev", wrt, _value_grad_hvp_body)
    return (value if aux is None else (value, _cache.merge_aux(aux))), grad, hv
