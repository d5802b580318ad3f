"""Boundary validation for the native API, and every error message it raises.

Every check takes `api`, the caller's full public name ("jhvp.hvp", "jhvp.to_scipy"), and
starts its message with it.

Checks that need only Python objects (`primals` is a sequence, `argnums`, `mode`) run before
anything is traced. Checks that need shapes and dtypes (tangent structure, integer primals, a
scalar output) run while the cached jitted function is traced: the jit cache is keyed on exactly
those shapes, dtypes and tree structures, so a mismatch always reaches a fresh trace and its error,
and a repeated, valid call pays nothing for validation.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._typing import MODES as MODES
from ._typing import STRATEGIES as STRATEGIES


def check_primals(primals: Any, api: str) -> tuple:
    """Returns `primals` as a tuple, or raises TypeError if it is not a tuple or list."""
    if isinstance(primals, tuple):
        return primals
    if isinstance(primals, list):
        return tuple(primals)
    raise TypeError(
        f"{api}: `primals` must be a tuple (or list) of f's positional arguments, "
        f"got {type(primals).__name__}. For a function of one argument x, pass `primals=(x,)`."
    )


def check_choice(value: Any, valid: tuple[str, ...], name: str, api: str, *,
                 plural: str = "values") -> str:
    """Raises ValueError unless `value` is one of `valid`, listing them; returns it.

    The one "unknown choice" message of jhvp, native and curvature alike: `name` as the message
    shows it ("mode", "`which`"), `plural` what the valid ones are called ("modes", "values").
    """
    if not isinstance(value, str) or value not in valid:
        listed = ", ".join(repr(m) for m in valid)
        raise ValueError(f"{api}: unknown {name} {value!r}; valid {plural} are {listed}.")
    return value


def check_has_aux(has_aux: Any, api: str) -> bool:
    """Raises TypeError unless `has_aux` is a bool."""
    if not isinstance(has_aux, bool | np.bool_):
        raise TypeError(f"{api}: `has_aux` must be a bool, got {type(has_aux).__name__}.")
    return bool(has_aux)


def check_argnums(argnums: Any, n_primals: int, api: str) -> tuple[int, ...]:
    """Returns `argnums` as a tuple of non-negative ints, validated against `n_primals`."""
    single = not isinstance(argnums, tuple | list)
    items = (argnums,) if single else tuple(argnums)
    if not items:
        raise ValueError(f"{api}: `argnums` must name at least one argument, got {argnums!r}.")
    normalised = []
    for a in items:
        if isinstance(a, bool | np.bool_):
            raise TypeError(
                f"{api}: `argnums` must be an int or a tuple of ints, got {argnums!r}."
            )
        try:
            a = operator.index(a)
        except TypeError:
            raise TypeError(
                f"{api}: `argnums` must be an int or a tuple of ints, got {argnums!r}."
            ) from None
        if not -n_primals <= a < n_primals:
            raise ValueError(
                f"{api}: argnums={argnums!r} is out of range for f called with "
                f"{n_primals} positional argument(s) (valid indices: 0..{n_primals - 1})."
            )
        normalised.append(a % n_primals)
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"{api}: `argnums` must not repeat an argument, got {argnums!r}.")
    return tuple(normalised)


def check_callable(f: Any, api: str, *, name: str = "f") -> None:
    """Raises TypeError unless f is callable."""
    if not callable(f):
        raise TypeError(f"{api}: `{name}` must be callable, got {type(f).__name__}.")


def check_differentiable_leaf(leaf: Any, where: str, api: str, advice: str | None = None) -> None:
    """Raises TypeError unless a differentiated leaf is real floating point.

    `advice` says how to hold the leaf fixed in its framework's words (`_select.advice`).
    """
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{api}: {where} is complex ({dtype}); the Hessian of a real loss in complex "
            "variables is not complex-linear, so H·v would be silently wrong (conjugated). Split "
            "it into real and imaginary parts (two real arrays, or `jnp.stack([z.real, z.imag])`) "
            "and rebuild the complex value inside f."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        advice = advice or (
            "Cast it (e.g. `x.astype(jnp.float32)`), or hold it fixed: pass it in an argument "
            "left out of `argnums`, as a Python int, or deselect it with `wrt=`."
        )
        raise TypeError(
            f"{api}: differentiated primals must have floating-point leaves, but {where} has "
            f"dtype {dtype}. {advice}"
        )


def _describe(leaf: Any) -> str:
    return f"shape {tuple(np.shape(leaf))}"


def check_tangents(primals: Any, tangents: Any, name: str, api: str) -> None:
    """Raises ValueError unless `tangents` has the tree structure and leaf shapes of `primals`.

    The message names the first missing or unexpected leaf by its key path and shows both
    structures.
    """
    p_leaves, p_tree = jax.tree_util.tree_flatten_with_path(primals)
    t_leaves, t_tree = jax.tree_util.tree_flatten_with_path(tangents)
    if p_tree != t_tree:  # type: ignore[operator]  # JAX gap: PyTreeDef is an untyped alias
        # Leaves are matched by key path, so one missing leaf is named as missing rather than
        # pairing every later leaf with the wrong one.
        p_paths = {jax.tree_util.keystr(path) for path, _ in p_leaves}
        t_paths = {jax.tree_util.keystr(path) for path, _ in t_leaves}
        missing = [(path, leaf) for path, leaf in p_leaves
                   if jax.tree_util.keystr(path) not in t_paths]
        extra = [(path, leaf) for path, leaf in t_leaves
                 if jax.tree_util.keystr(path) not in p_paths]
        if missing:
            path, leaf = missing[0]
            detail = (f"{name}{jax.tree_util.keystr(path)} with {_describe(leaf)} is missing "
                      "(or None)")
        elif extra:
            path, leaf = extra[0]
            detail = f"{name}{jax.tree_util.keystr(path)} with {_describe(leaf)} is not expected"
        else:
            detail = "the leaves match but the containers differ (e.g. a list for a tuple)"
        raise ValueError(
            f"{api}: `{name}` must have the tree structure of the differentiated primals "
            f"(the gradient's structure): {detail}.\n"
            f"Expected structure: {p_tree}\nGot structure:      {t_tree}"
        )
    for (path, pl), (_, tl) in zip(p_leaves, t_leaves, strict=True):
        if np.shape(pl) != np.shape(tl):
            raise ValueError(
                f"{api}: `{name}` leaf {name}{jax.tree_util.keystr(path)} has "
                f"{_describe(tl)}, but the primal it pairs with has {_describe(pl)}."
            )
        if jnp.issubdtype(jnp.result_type(tl), jnp.complexfloating) and not jnp.issubdtype(
            jnp.result_type(pl), jnp.complexfloating
        ):
            raise TypeError(
                f"{api}: `{name}` leaf {name}{jax.tree_util.keystr(path)} is complex "
                f"({jnp.result_type(tl)}) but its primal is real ({jnp.result_type(pl)})."
            )


def check_scalar_output(out: Any, has_aux: bool, api: str) -> Any:
    """Returns the scalar loss from f's output, or raises TypeError explaining what went wrong."""
    if has_aux:
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise TypeError(
                f"{api}: with has_aux=True, f must return a pair (scalar, aux), "
                f"got {type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, tuple | list) else "")
                + "."
            )
        out = out[0]
    elif isinstance(out, tuple | list):
        raise TypeError(
            f"{api}: f must return a real scalar, got a {type(out).__name__} of length "
            f"{len(out)}. If f returns (loss, aux), pass has_aux=True."
        )
    if not hasattr(out, "shape") and not isinstance(out, int | float | np.number):
        raise TypeError(
            f"{api}: f must return a real scalar, got {type(out).__name__}."
            + ("" if has_aux else " If f returns (loss, aux), pass has_aux=True.")
        )
    shape, dtype = np.shape(out), jnp.result_type(out)
    if shape != ():
        raise TypeError(
            f"{api}: f must return a real scalar, but it returned an array of shape {shape}. "
            "Reduce it to a scalar (e.g. `.sum()` or `.mean()`)"
            + (", or pass has_aux=True if f returns (loss, aux)." if not has_aux else ".")
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{api}: f must return a real floating-point scalar, got dtype {dtype}. "
            "Integer outputs have no derivative; complex ones need a real loss (e.g. `abs(z)**2`)."
        )
    return out


_WHILE_LOOP_MARK = "Reverse-mode differentiation does not work for lax.while_loop"
_CUSTOM_VJP_MARKS = ("custom_lin", "forward-mode autodiff (jvp) to a custom_vjp")


def explain_ad_failure(err: Exception, mode: str, api: str) -> Exception | None:
    """Returns a clearer exception for a known JAX AD failure, or None to re-raise as is."""
    text = str(err)
    if _WHILE_LOOP_MARK in text:
        return ValueError(
            f"{api}: f contains a `lax.while_loop` (or a `fori_loop` with traced bounds), "
            "which JAX cannot differentiate in reverse mode, and every Hessian-vector route needs "
            "a reverse pass. Use `lax.scan`, or `lax.fori_loop` with Python-int bounds, so the "
            "trip count is known when tracing."
        )
    if mode == "rev_fwd" and any(m in text for m in _CUSTOM_VJP_MARKS):
        return TypeError(
            f"{api}: mode='rev_fwd' applies forward mode to f first, which JAX cannot do "
            "through a `jax.custom_vjp` function. Use mode='fwd_rev' (the default) or 'rev_rev'."
        )
    return None
