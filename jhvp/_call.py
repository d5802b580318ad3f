"""One public call: options validated, f and primals split, the cached program found and run.

Everything here runs per call except what is marked "trace time", which runs once per compiled
program. The per-call path is kept short: a dict hit for the options, one flatten of f and of each
primal, one of the tangents, a dict hit for the program.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks, _filter, _jit

_tree_flatten = jax.tree_util.default_registry.flatten  # tree_flatten, one frame less
_MethodType = types.MethodType

_options: dict = {}


def options(api: str, n_primals: int, argnums: Any, has_aux: Any, mode: Any = "fwd_rev",
            extra: tuple = ()) -> _jit.CallKey:
    """Returns the validated, interned options; invalid ones raise the same error every time."""
    raw = (api, n_primals, type(argnums), argnums, type(has_aux), has_aux, type(mode), mode, extra)
    try:
        return _options[raw]
    except (KeyError, TypeError):  # a miss, or an unhashable argument (argnums=np.array(0))
        pass
    _checks.check_mode(mode, api)
    has_aux = _checks.check_has_aux(has_aux, api)
    single = not isinstance(argnums, tuple | list)
    nums = _checks.check_argnums(argnums, n_primals, api)
    key = _jit.CallKey.of(api, nums, single, has_aux, mode, extra)
    try:
        if len(_options) < 4096:
            _options[raw] = key
    except TypeError:
        pass
    return key


def run(key: _jit.CallKey, f: Callable, primals: tuple,
        build: Callable[[_jit.Entry, _jit.CallKey], Callable], vectors: Any = None,
        name: str | None = None) -> Any:
    """Runs the cached program for this call and returns its output.

    `vectors` and their `name` ("tangents", "cotangents") are given by calls that take vectors.
    The per-call path, kept flat: one flatten of (f, primals, vectors), a plan found by treedef,
    the leaves' roles, an entry found by roles, the call under the entry's lock (which makes
    concurrent first calls trace once; while tracing, the program reads this call's leaves from
    the entry).
    """
    if type(f) is _MethodType or not callable(f):
        _checks.check_callable(f, key.api)
        f = _filter.as_pytree_callable(f)
    leaves, treedef = _tree_flatten((f, primals, vectors))
    plan = key.plans.get(treedef) or _jit.plan(key, treedef)
    roles, dynamic = _filter.roles(leaves, plan.in_diff)
    entry = plan.entries.get(roles) or _make_entry(key, plan, roles, leaves, build, vectors, name)
    with entry.lock:
        entry.leaves = leaves
        try:
            if name is None:
                return entry.jitted(dynamic)
            vecs = leaves[entry.layout.n_inputs :]
            if entry.selection is not None:
                vecs = [vecs[i] for i in entry.selection]
            return entry.jitted(dynamic, vecs)
        finally:
            entry.leaves = None


def _make_entry(key, plan, roles, leaves, build, vectors, name) -> _jit.Entry:
    # A miss: the vectors' structure is checked against the differentiated primals' before the
    # entry exists, so a bad structure raises on every call.
    def make() -> _jit.Entry:
        layout = _filter.Layout(plan, roles, leaves, key.argnums)
        selection = None
        if name is not None:
            selection = layout.vector_selection(key.single)
            if selection is False:
                diff = [leaves[p] for p in layout.diff_positions]
                _checks.check_tangents(layout.unflatten_diff(diff, key.single), vectors, name,
                                       key.api)
                raise AssertionError("unreachable: check_tangents accepted a bad structure")
        made = _jit.Entry(layout, selection)
        made.jitted = build(made, key)
        return made

    return _jit.lookup(plan.entries, roles, make)


# ---- trace time -------------------------------------------------------------------------------


def traced_leaves(entry: _jit.Entry, dynamic: list) -> list:
    """This call's leaves with the traced arrays in place (trace time)."""
    leaves = list(entry.leaves)
    for position, x in zip(entry.layout.dynamic_positions, dynamic, strict=True):
        leaves[position] = x
    return leaves


def differentiated(entry: _jit.Entry, leaves: list, api: str) -> list:
    """The differentiated leaves, checked to be real floating point (trace time)."""
    layout = entry.layout
    diff = []
    for k, i in enumerate(layout.argnums):
        lo, primal_leaves = layout.primal_leaves(leaves, i)
        for p in layout.full_diff_positions[k]:
            leaf = primal_leaves[p]
            dtype = jnp.result_type(leaf)
            if not jnp.issubdtype(dtype, jnp.floating):
                tree = layout.plan.trees[i + 1]
                paths = jax.tree_util.tree_flatten_with_path(tree.unflatten(primal_leaves))[0]
                where = f"primals[{i}]{jax.tree_util.keystr(paths[p][0])}"
                _checks.check_differentiable_leaf(leaf, where, api)
            diff.append(jnp.asarray(leaf) if isinstance(leaf, float) else leaf)
    return diff


def checked_tangents(entry: _jit.Entry, diff: list, vecs: list, key: _jit.CallKey,
                     name: str) -> list:
    """Tangent leaves checked against the primals' shapes and cast to their dtypes (trace time)."""
    for p, t in zip(diff, vecs, strict=True):
        bad_shape = jnp.shape(p) != jnp.shape(t)
        bad_kind = jnp.issubdtype(jnp.result_type(t), jnp.complexfloating)
        if bad_shape or bad_kind:
            layout = entry.layout
            _checks.check_tangents(layout.unflatten_diff(diff, key.single),
                                   layout.unflatten_diff(vecs, key.single), name, key.api)
    return [jnp.asarray(t, dtype=jnp.result_type(p)) for p, t in zip(diff, vecs, strict=True)]


def make_loss(entry: _jit.Entry, leaves: list, has_aux: bool, api: str, aux_box: list):
    """`loss(d) -> (value, aux arrays)`: f of the differentiated leaves (trace time).

    aux's array leaves are traced outputs; the rest of aux (its structure, non-array leaves) is
    put in `aux_box` and returned as static data, so aux comes back exactly as f returned it.
    """
    layout = entry.layout
    positions = layout.diff_positions

    def loss(d: list):
        full = list(leaves)
        for p, x in zip(positions, d, strict=True):
            full[p] = x
        f, primals = layout.rebuild(full)
        out = f(*primals)
        value = _checks.check_scalar_output(out, has_aux, api)
        if not has_aux:
            return value, None
        aux_leaves, aux_tree = jax.tree.flatten(out[1])
        is_array = [_filter.is_array(x) for x in aux_leaves]
        aux_box[:] = [(aux_tree, tuple(None if a else x
                                       for a, x in zip(is_array, aux_leaves, strict=True)))]
        return value, [x for a, x in zip(is_array, aux_leaves, strict=True) if a]

    return loss


def aux_output(aux_arrays: list | None, aux_box: list, has_aux: bool):
    """What the program returns for aux: its arrays, and the rest as static data (trace time)."""
    return (aux_arrays, _filter.Static(aux_box[0])) if has_aux else None


def merge_aux(out_aux) -> Any:
    """Rebuilds aux exactly as f returned it, from a program's `aux_output` (per call)."""
    arrays, static = out_aux
    tree, leaves = static.value
    it = iter(arrays)
    return tree.unflatten([next(it) if x is None else x for x in leaves])
