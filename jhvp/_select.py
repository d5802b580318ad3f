"""Which leaves of the differentiated primals are differentiated: `wrt=` and the frameworks' rules.

By default every floating-point leaf of a differentiated primal is, as under `jax.grad`, except
where a framework says otherwise, as its own `grad` does:

- **Flax NNX**: only `nnx.Param` variables (`nnx.grad`'s default); `nnx.BatchStat` running
  statistics, RNG keys and counters are held fixed.
- **Flax linen**: in a `variables` dict holding both "params" and "batch_stats", only "params".

`wrt=` overrides that: a pytree prefix of bools (Equinox's `filter_spec`: `{"w": True, "v":
False}` differentiates w only), a callable on a leaf (`eqx.is_inexact_array`), or, for NNX
modules, an NNX filter (a Variable type such as `nnx.Param`, or an `nnx.filterlib` filter). With a
tuple `argnums`, `wrt` is a tuple with one entry per differentiated argument.

Everything here runs once per structure (the compile cache keeps the answer), except a callable
`wrt`, which looks at each leaf on every call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from . import _filter


def _nnx() -> Any:
    """The flax.nnx module if the user has imported it (jhvp never imports it itself)."""
    module = sys.modules.get("flax.nnx")
    return module if module is not None and hasattr(module, "Variable") else None


def _variable_leaves(primal: Any) -> list[tuple[tuple, Any, int]] | None:
    """(path, variable or None, number of array leaves) per NNX variable; None without NNX."""
    nnx = _nnx()
    if nnx is None:
        return None
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    items = jax.tree_util.tree_flatten_with_path(primal, is_leaf=is_var)[0]
    if not any(is_var(x) for _, x in items):
        return None
    return [(path, x if is_var(x) else None, len(jax.tree.leaves(x)) if is_var(x) else 1)
            for path, x in items]


def _names(path: tuple) -> tuple:
    return tuple(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))) for k in path)


def default_mask(primal: Any) -> list[bool] | None:
    """Per leaf of `primal`, whether its framework differentiates it (None: every leaf)."""
    variables = _variable_leaves(primal)
    if variables is not None:
        nnx = _nnx()
        return [isinstance(v, nnx.Param) if v is not None else True
                for _, v, count in variables for _ in range(count)]
    if isinstance(primal, Mapping) and "params" in primal and "batch_stats" in primal:
        return [key == "params" for key in primal for _ in jax.tree.leaves(primal[key])]
    return None


def _is_nnx_filter(wrt: Any) -> bool:
    nnx = _nnx()
    if nnx is None:
        return False
    if isinstance(wrt, type):
        return issubclass(wrt, nnx.Variable)
    return isinstance(wrt, str) or type(wrt).__module__.startswith("flax.nnx.filterlib")


def normalise(wrt: Any, single: bool, api: str) -> Any:
    """The hashable form of `wrt` for the compile key (validated); None for the default."""
    if wrt is None:
        return None
    items = (wrt,) if single else wrt
    if not single and not isinstance(wrt, tuple | list):
        raise TypeError(
            f"{api}: with a tuple `argnums`, `wrt` must be a tuple with one entry per "
            f"differentiated argument, got {type(wrt).__name__}."
        )
    out: list[tuple | None] = []
    for item in items:
        if item is None:
            out.append(None)
        elif _is_nnx_filter(item):
            out.append(("nnx", _filter.static_key(item)))
        elif callable(item) and not isinstance(item, bool):
            out.append(("leaf", _filter.static_key(item)))
        else:
            bools, tree = jax.tree.flatten(item)
            if not all(isinstance(b, bool) for b in bools):
                bad = next(b for b in bools if not isinstance(b, bool))
                raise TypeError(
                    f"{api}: `wrt` must be a pytree prefix of bools (e.g. {{'w': True, 'b': "
                    f"False}}), a callable on a leaf (e.g. eqx.is_inexact_array) or an NNX "
                    f"filter (e.g. nnx.Param); it holds {type(bad).__name__} ({bad!r})."
                )
            out.append(("prefix", tree, tuple(bools)))
    return out[0] if single else tuple(out)


def _prefix_mask(spec: tuple, primal: Any, api: str) -> list[bool]:
    _, tree, bools = spec
    prefix = tree.unflatten(bools)
    try:
        full = jax.tree.broadcast(prefix, primal)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{api}: `wrt` must be a pytree prefix of the differentiated argument: {err}"
        ) from None
    return jax.tree.leaves(full)


def _nnx_mask(spec: tuple, primal: Any, api: str) -> list[bool]:
    nnx = _nnx()
    variables = _variable_leaves(primal)
    selector = _filter.static_value(spec[1])
    if variables is None:
        raise TypeError(
            f"{api}: `wrt`={selector!r} is an NNX filter, but the differentiated argument is not "
            "an NNX module; pass a pytree prefix of bools or a callable on a leaf."
        )
    predicate = nnx.filterlib.to_predicate(selector)
    return [v is not None and bool(predicate(_names(path), v))
            for path, v, count in variables for _ in range(count)]


def mask(wrt: Any, primal: Any, api: str) -> list[bool] | None:
    """Per leaf of `primal`, whether it is differentiated; None: every one.

    A callable `wrt` is applied per call instead (`leaf_predicate`).
    """
    if wrt is None or wrt[0] == "leaf":
        return default_mask(primal) if wrt is None else None
    if wrt[0] == "nnx":
        return _nnx_mask(wrt, primal, api)
    return _prefix_mask(wrt, primal, api)


def leaf_predicate(wrt: Any) -> Callable[[Any], bool] | None:
    """A callable `wrt`, to apply to each leaf on every call; None otherwise."""
    if wrt is None or wrt[0] != "leaf":
        return None
    return _filter.static_value(wrt[1])


def advice(primal: Any, position: int) -> str:
    """How to hold a non-float leaf fixed, in the words of the framework it comes from."""
    variables = _variable_leaves(primal)
    if variables is not None:
        k = 0
        for _, v, count in variables:
            if k <= position < k + count and v is not None:
                return (f"It is an nnx.{type(v).__name__}: to hold it fixed, leave it out of "
                        "`wrt=` (only nnx.Param is differentiated by default, e.g. "
                        "wrt=nnx.Param).")
            k += count
    if type(primal).__module__.split(".")[0] == "equinox" or any(
            c.__module__.split(".")[0] == "equinox" for c in type(primal).__mro__[1:]):
        return ("To hold it fixed, pass `wrt=eqx.is_inexact_array`, or make it a static field "
                "(`eqx.field(static=True)`).")
    return ("Cast it (e.g. `x.astype(jnp.float32)`), or hold it fixed: pass it in an argument "
            "left out of `argnums`, as a Python int, or deselect it with `wrt=`.")


# ---- Flax NNX State vectors (what nnx.grad returns) ---------------------------------------------


def is_state(x: Any) -> bool:
    """Whether `x` is an `nnx.State` (the output of `nnx.grad`)."""
    nnx = _nnx()
    return nnx is not None and isinstance(x, nnx.State)


def from_state(state: Any, diff_tree: Any, paths: Sequence[tuple]) -> Any:
    """An nnx.State of vectors as the module-shaped tangent `diff_tree` (paths: its leaves')."""
    nnx = _nnx()
    flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    paths = list(paths)
    leaves = []
    for path in paths:
        found = flat.get(path)
        if found is None:
            raise ValueError(
                f"the nnx.State has no entry at {'/'.join(map(str, path))}, a differentiated "
                "parameter; pass the State that nnx.grad returns for these parameters (or a "
                "module-shaped vector)."
            )
        leaves.append(jax.tree.leaves(found)[0])
    if len(flat) != len(paths):
        extra = sorted(set(flat) - set(paths))
        raise ValueError(
            f"the nnx.State has entries that are not differentiated parameters: "
            f"{['/'.join(map(str, p)) for p in extra]}; select them with `wrt=` or drop them."
        )
    return diff_tree.unflatten(leaves)


def to_state(tree: Any, like_state: Any, paths: Sequence[tuple]) -> Any:
    """A module-shaped vector (leaves at `paths`) as an nnx.State shaped like `like_state`."""
    values = dict(zip(paths, jax.tree.leaves(tree), strict=True))
    with_path, treedef = jax.tree_util.tree_flatten_with_path(like_state)
    keys = [_names(path) for path, _ in with_path]
    return jax.tree.unflatten(treedef, [values[k[:-1] if k[-1] == "value" else k] for k in keys])


def variable_paths(primal: Any, positions: tuple[int, ...]) -> tuple[tuple, ...] | None:
    """The NNX state paths (attribute names) of the given leaves of `primal`; None without NNX."""
    variables = _variable_leaves(primal)
    if variables is None:
        return None
    paths = [_names(path) for path, _, count in variables for _ in range(count)]
    return tuple(paths[p] for p in positions)
