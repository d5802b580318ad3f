"""The operator protocol: an operator plus a structure becomes a flat matvec inside one jit.

`jhvp.curvature` sees an operator only through this module, so every algorithm serves
`HessianOperator`, the GGN and Fisher operators and user callables `v -> A v` alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .._typing import PyTree


def _leaf_struct(leaf: Any, path: tuple, api: str, name: str) -> jax.ShapeDtypeStruct:
    where = f"`{name}`{jax.tree_util.keystr(path)}"
    if isinstance(leaf, jax.ShapeDtypeStruct):
        struct = leaf
    elif isinstance(leaf, jax.Array | np.ndarray | np.generic):
        struct = jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf))
    elif isinstance(leaf, float):
        struct = jax.ShapeDtypeStruct((), jnp.result_type(float))
    else:
        raise TypeError(
            f"jhvp.curvature.{api}: every leaf of `{name}` must be an array, a "
            f"jax.ShapeDtypeStruct or a float; {where} is {type(leaf).__name__} ({leaf!r}). "
            "Pass a pytree of arrays or jax.ShapeDtypeStruct with the structure of v."
        )
    if not jnp.issubdtype(struct.dtype, jnp.floating):
        raise TypeError(
            f"jhvp.curvature.{api}: vectors must be real floating point, but {where} has dtype "
            f"{struct.dtype}. Pass `{name}` with a float dtype (e.g. x.astype(jnp.float32))."
        )
    return struct


def structure(op: Any, like: PyTree, api: str, *, name: str = "like") -> PyTree:
    """Returns the structure of the vectors `op` applies to: a pytree of `jax.ShapeDtypeStruct`.

    `like` wins when given (arrays or ShapeDtypeStructs, converted); else `op.in_structure()`.
    `name` is the argument's name in error messages (`lanczos` passes "v0").

    Raises:
        TypeError: `op` is a plain callable and `like` is None; a `like` leaf that is not an
            array, ShapeDtypeStruct or float; a non-floating dtype.
        ValueError: The structure has no array leaves.
    """
    if like is None:
        if not hasattr(op, "in_structure"):
            raise TypeError(
                f"jhvp.curvature.{api}: `op` is a plain callable; pass `like=` (a pytree of "
                "arrays or jax.ShapeDtypeStruct with the structure of v)."
            )
        like = op.in_structure()
    with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
    if not with_path:
        raise ValueError(
            f"jhvp.curvature.{api}: the vectors `op` applies to have no array leaves "
            f"(structure {treedef}); pass `like=` with at least one array."
        )
    return jax.tree.unflatten(treedef, [_leaf_struct(x, p, api, name) for p, x in with_path])


class FlatOperator(NamedTuple):
    """An operator seen as a map on flat vectors, built at trace time by `flatten`."""

    matvec: Callable[[jax.Array], jax.Array]
    """(n,) -> (n,): unravel, apply the operator, ravel."""
    n: int
    """The number of scalar entries of a vector."""
    dtype: Any
    """The dtype of the flat vectors."""
    unravel: Callable[[jax.Array], PyTree]
    """(n,) -> a pytree with the operator's structure."""
    ravel: Callable[[PyTree], jax.Array]
    """A pytree with the operator's structure -> (n,)."""


def _check_output(out: PyTree, struct: PyTree, api: str) -> None:
    want, want_def = jax.tree_util.tree_flatten_with_path(struct)
    got, got_def = jax.tree_util.tree_flatten_with_path(out)
    if want_def != got_def:
        want_paths = [jax.tree_util.keystr(p) for p, _ in want]
        got_paths = [jax.tree_util.keystr(p) for p, _ in got]
        first = next(
            (w for w, g in zip(want_paths, got_paths, strict=False) if w != g),
            (want_paths + got_paths)[min(len(want_paths), len(got_paths))],
        )
        raise ValueError(
            f"jhvp.curvature.{api}: `like` does not match what op returns: the structures differ "
            f"first at leaf {first or '<root>'} (like: {want_def}; op returned: {got_def}). "
            "Pass `like` with the structure of op's input and output vectors."
        )
    for (path, w), (_, g) in zip(want, got, strict=True):
        if tuple(w.shape) != tuple(jnp.shape(g)):
            raise ValueError(
                f"jhvp.curvature.{api}: `like` does not match what op returns: leaf "
                f"{jax.tree_util.keystr(path) or '<root>'} has shape {tuple(w.shape)} in `like` "
                f"but {tuple(jnp.shape(g))} in op's output. Pass `like` with the shapes of v."
            )


def flatten(op: Any, struct: PyTree, api: str) -> FlatOperator:
    """Returns `op` as a `FlatOperator` over `jax.flatten_util.ravel_pytree` order.

    Called at trace time: the zeros used to build `unravel` are dead code XLA removes. The first
    application checks (once, at trace time) that `op` returns vectors of `struct`'s shapes.
    """
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), struct)
    flat, unravel = ravel_pytree(zeros)
    dtype = flat.dtype
    checked = []

    def ravel(tree: PyTree) -> jax.Array:
        return jnp.asarray(ravel_pytree(tree)[0], dtype)

    def matvec(x: jax.Array) -> jax.Array:
        if checked:
            return ravel(op(unravel(x)))
        try:
            out = op(unravel(x))
        except (TypeError, ValueError) as err:
            # Most often `like` has the wrong shapes for op; say so instead of a bare dot_general.
            raise ValueError(
                f"jhvp.curvature.{api}: `like` does not match what op accepts: applying op to a "
                f"vector with the structure of `like` ({struct}) raised {type(err).__name__}: "
                f"{err}"
            ) from err
        _check_output(out, struct, api)
        checked.append(True)
        return ravel(out)

    return FlatOperator(matvec, int(flat.size), dtype, unravel, ravel)


class _Static:
    """A hashable stand-in for a non-array leaf: by value where hashable, else by identity."""

    __slots__ = ("hashable", "value")

    def __init__(self, value: Any):
        self.value = value
        try:
            hash(value)
            self.hashable = True
        except TypeError:
            self.hashable = False

    def __hash__(self) -> int:
        return hash(self.value) if self.hashable else id(self.value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Static):
            return False
        if self.value is other.value:
            return True
        if not (self.hashable and other.hashable):
            return False
        try:
            return type(self.value) is type(other.value) and bool(self.value == other.value)
        except Exception:  # noqa: BLE001 - an __eq__ that cannot answer means "different"
            return False


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray)


class _StaticPack(NamedTuple):
    treedef: Any
    leaves: tuple


def _partition(op: Any) -> tuple[list, _StaticPack]:
    leaves, treedef = jax.tree.flatten(op)
    if treedef == jax.tree.structure(0) and not _is_array(op):
        # A plain function or bound method: keyed on identity, as jax.tree_util.Partial(op) is.
        op = jax.tree_util.Partial(op)
        leaves, treedef = jax.tree.flatten(op)
    dynamic = [x if _is_array(x) else None for x in leaves]
    static = tuple(None if _is_array(x) else _Static(x) for x in leaves)
    return dynamic, _StaticPack(treedef, static)


def _combine(dynamic: list, pack: _StaticPack) -> Any:
    leaves = [d if s is None else s.value for d, s in zip(dynamic, pack.leaves, strict=True)]
    return jax.tree.unflatten(pack.treedef, leaves)


@functools.partial(jax.jit, static_argnames=("impl", "pack", "struct", "api", "config"))
def _program(dynamic, args, *, impl, pack, struct, api, config):
    op = _combine(dynamic, pack)
    flat_op = flatten(op, jax.tree.unflatten(struct[0], struct[1]), api)
    return impl(flat_op, *args, **dict(config))


def run(impl: Callable, op: Any, struct: PyTree, *args: Any, api: str, **config: Any) -> Any:
    """Runs `impl(flat_op, *args, **config)` as one `jax.jit` program with `op` as an argument.

    The operator's array leaves are traced arguments, never closed over: closing over them bakes
    them into the executable as constants (measured 3.4x slower, DESIGN.md). Its other leaves
    (functions, Python scalars) and `config` are static, part of the compile key. Inside a
    user's `jax.jit` this is an ordinary nested call.
    """
    dynamic, pack = _partition(op)
    leaves, treedef = jax.tree.flatten(struct)
    return _program(
        dynamic,
        args,
        impl=impl,
        pack=pack,
        struct=(treedef, tuple(leaves)),
        api=api,
        config=tuple(sorted(config.items())),
    )


def size(struct: PyTree) -> int:
    """Returns n, the number of scalar entries of a vector with structure `struct`."""
    return sum(int(np.prod(s.shape, dtype=np.int64)) for s in jax.tree.leaves(struct))


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
            f"jhvp.curvature.{api}: `key` must be one PRNG key (jax.random.key(0) or "
            f"jax.random.PRNGKey(0)), got {got}."
        )


def check_int(value: Any, name: str, api: str, *, low: int = 1, high: int | None = None,
              why: str = "") -> int:
    """Checks that `value` is an int in [low, high] and returns it.

    Raises:
        TypeError: Not an int.
        ValueError: Out of range; `why` explains the upper bound.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"jhvp.curvature.{api}: `{name}` must be an int, got {type(value).__name__} "
            f"({value!r})."
        )
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"jhvp.curvature.{api}: `{name}` must be {bound}{why}, got {value}.")
    return value


def check_choice(value: Any, valid: tuple[str, ...], name: str, api: str) -> str:
    """Checks that `value` is one of `valid` and returns it.

    Raises:
        ValueError: Anything else, listing the valid values.
    """
    if not isinstance(value, str) or value not in valid:
        raise ValueError(
            f"jhvp.curvature.{api}: unknown `{name}` {value!r}; valid values are "
            f"{', '.join(repr(v) for v in valid)}."
        )
    return value


def check_positive(value: Any, name: str, api: str, *, optional: bool = True) -> float | None:
    """Checks that `value` is a positive real number (or None when `optional`) and returns it.

    Raises:
        TypeError: Not a real number.
        ValueError: Not positive and finite.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(
            f"jhvp.curvature.{api}: `{name}` must be a positive Python float, got "
            f"{type(value).__name__} ({value!r})."
        )
    if not (0 < float(value) < float("inf")):
        raise ValueError(
            f"jhvp.curvature.{api}: `{name}` must be positive and finite, got {value!r}."
        )
    return float(value)
