"""The curvature package's argument checks, each written once, in one voice.

Every check takes `api`, the caller's full public name ("jhvp.curvature.eigh"), and starts its
message with it; "unknown choice" is `jhvp._checks.check_choice`, shared with the native API.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_choice as check_choice
from .._typing import PyTree


def check_key(key: Any, api: str) -> None:
    """Checks that `key` is one PRNG key: a typed key array of shape () or a raw uint32 (2,).

    Raises:
        TypeError: Anything else.
    """
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = isinstance(key, jax.Array | np.ndarray) and key.dtype == np.uint32
    if not ((typed and key.shape == ()) or (raw and key.shape == (2,))):
        got = f"{type(key).__name__}" + (
            f" of shape {key.shape} and dtype {key.dtype}" if hasattr(key, "dtype") else ""
        )
        raise TypeError(
            f"{api}: `key` must be one PRNG key (jax.random.key(0) or "
            f"jax.random.PRNGKey(0)), got {got}."
        )


@overload
def check_int(value: Any, name: str, api: str, *, low: int = 1, high: int | None = None,
              why: str = "", optional: Literal[False] = False, kind: str = "an int") -> int: ...
@overload
def check_int(value: Any, name: str, api: str, *, low: int = 1, high: int | None = None,
              why: str = "", optional: bool, kind: str = "an int") -> int | None: ...
def check_int(value: Any, name: str, api: str, *, low: int = 1, high: int | None = None,
              why: str = "", optional: bool = False, kind: str = "an int") -> int | None:
    """Checks that `value` is an int in [low, high] (or None when `optional`) and returns it.

    Raises:
        TypeError: Not an int (nor None when `optional`); `kind` says what is expected.
        ValueError: Out of range; `why` explains the bound.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        expected = f"None or {kind}" if optional else kind
        raise TypeError(
            f"{api}: `{name}` must be {expected}, got {type(value).__name__} ({value!r})."
        )
    value = int(value)
    if value < low or (high is not None and value > high):
        if high is not None:
            bound = f"between {low} and {high}"
        else:
            bound = f"at least {low}" if kind == "an int" else kind
        raise ValueError(f"{api}: `{name}` must be {bound}{why}, got {value}.")
    return value


@overload
def check_positive(value: Any, name: str, api: str, *, optional: Literal[False]) -> float: ...
@overload
def check_positive(value: Any, name: str, api: str, *, optional: bool = True) -> float | None: ...
def check_positive(value: Any, name: str, api: str, *, optional: bool = True) -> float | None:
    """Checks that `value` is a positive real number (or None when `optional`) and returns it.

    Raises:
        TypeError: Not a real number (with `optional=False`, None included).
        ValueError: Not positive and finite.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(
            f"{api}: `{name}` must be a positive Python float, got {type(value).__name__} "
            f"({value!r})."
        )
    if not (0 < float(value) < float("inf")):
        raise ValueError(f"{api}: `{name}` must be positive and finite, got {value!r}.")
    return float(value)


def check_batch_size(batch_size: Any, api: str) -> int | None:
    """Checks that `batch_size` is None (all probes at once) or a positive int; returns it."""
    return check_int(batch_size, "batch_size", api, optional=True, kind="a positive int",
                     why=" (probes per chunk) or None (all at once)")


def check_budget(num_matvecs: Any, method: Any, methods: tuple[str, ...],
                 multiple: dict[str, int], api: str) -> int:
    """Checks `method` and `num_matvecs` (before n is known); returns num_matvecs as an int."""
    check_choice(method, methods, "method", api, plural="methods")
    m = check_int(num_matvecs, "num_matvecs", api)
    k = multiple.get(method, 1)
    if m % k:
        lower, upper = k * (m // k), k * (m // k + 1)
        suggest = f"{upper}" if lower == 0 else f"{lower} or {upper}"
        raise ValueError(
            f"{api}: method {method!r} needs `num_matvecs` divisible by {k}, got {m}; use "
            f"{suggest}."
        )
    return m


def check_dimension(m: int, n: int, exact: str, api: str) -> None:
    """Raises ValueError if the budget m exceeds the dimension n, which buys the exact answer."""
    if m > n:
        raise ValueError(
            f"{api}: `num_matvecs` ({m}) exceeds the operator's dimension n = {n}; "
            f"n matvecs already give the exact answer: use {exact}, or num_matvecs <= {n}."
        )


def check_vector(tree: PyTree, struct: PyTree, name: str, api: str) -> PyTree:
    """Checks `tree` against the operator's structure; returns it cast to its dtypes."""
    want, want_def = jax.tree.flatten(struct)
    got_paths, got_def = jax.tree_util.tree_flatten_with_path(tree)
    if want_def != got_def:  # type: ignore[operator]  # JAX gap: PyTreeDef is an untyped alias
        raise ValueError(
            f"{api}: `{name}` must have the structure of the vectors op applies "
            f"to ({want_def}), got {got_def}. Pass `{name}` shaped like op.in_structure()."
        )
    out = []
    for (path, leaf), w in zip(got_paths, want, strict=True):
        if tuple(np.shape(leaf)) != tuple(w.shape):
            raise ValueError(
                f"{api}: `{name}` leaf {jax.tree_util.keystr(path) or '<root>'} "
                f"has shape {tuple(np.shape(leaf))}, but op applies to shape {tuple(w.shape)}."
            )
        out.append(jnp.asarray(leaf, w.dtype))
    return jax.tree.unflatten(got_def, out)


def check_scalar_option(value: Any, name: str, api: str) -> None:
    """Checks a non-negative real scalar (`damping`, `rtol`, `atol`); traced values pass.

    Raises:
        TypeError: Not a real number.
        ValueError: Not a scalar, or negative.
    """
    if isinstance(value, jax.core.Tracer):
        return  # a traced value (inside the user's jit) cannot be checked here
    if value is None or isinstance(value, bool) or not (
            isinstance(value, int | float | np.integer | np.floating)
            or (_is_array_like(value) and jnp.issubdtype(jnp.result_type(value), jnp.floating))):
        raise TypeError(
            f"{api}: `{name}` must be a non-negative real number, got {type(value).__name__} "
            f"({value!r})."
        )
    if np.ndim(value) != 0:
        raise ValueError(f"{api}: `{name}` must be a scalar, got shape {np.shape(value)}.")
    if not np.all(np.asarray(value) >= 0):
        fix = (" (a shift that makes A + λI positive needs λ > -λ_min(A) > 0)"
               if name == "damping" else "")
        raise ValueError(f"{api}: `{name}` must be non-negative, got {value!r}{fix}.")


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "dtype") and hasattr(x, "shape")
