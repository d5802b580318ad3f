"""The compile cache and the per-call path: one jitted program per compile key, nothing kept alive.

A native call (`run`) goes: options validated and interned once (`options`), one flatten of
(f, primals, vectors), a `Plan` found by structure, each leaf's role (`_filter.roles`), an `Entry`
found by roles, the entry's program called. A program is traced with one hand-off object,
`Traced`: the differentiated leaves, the checked vectors, f's loss of the differentiated leaves,
and how to rebuild f and the primals. Each public function only supplies a `body(traced)` that
picks an AD route and shapes its result.

Lifetime: nothing a user passes is held strongly. Keys hold static leaves and object-owning
structures weakly (`_filter.static_key`, `_filter.structure_key`); when one dies, a weakref
callback evicts its entry and with it the traces and executables. The cache itself holds no
structure of f: a program reads the running call's leaves and structure from its entry's `Slot`
while it is traced (under the entry's lock, which also makes concurrent first calls trace once).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from . import _checks, _filter, _select

# Beyond this many entries the oldest is dropped (keys holding a fresh pure value per call).
_MAX_ENTRIES = 4096

_tree_flatten = jax.tree_util.default_registry.flatten  # tree_flatten, one frame less


@dataclasses.dataclass(frozen=True)
class CallKey:
    """The validated options of a native call (which function, argnums, has_aux, mode, ...)."""

    api: str
    argnums: tuple[int, ...] = ()
    single: bool = True
    has_aux: bool = False
    mode: str = "fwd_rev"
    extra: tuple = ()
    wrt: Any = None  # `_select.normalise`'s hashable form; None for the frameworks' defaults


class Options:
    """A `CallKey` and the plans of the structures called with it (interned: one per key)."""

    __slots__ = ("key", "plans", "weak_plans")

    def __init__(self, key: CallKey):
        self.key = key
        self.plans: dict = {}  # pure structure (treedef) -> Plan
        self.weak_plans: dict = {}  # structure_key of an object-owning structure -> Plan


_lock = threading.Lock()
_options: dict = {}  # the raw arguments, types included -> Options
_interned: dict = {}  # CallKey -> Options
_tables: dict = {}  # name -> entries, for programs keyed outside a Plan (curvature, compat)


def options(api: str, n_primals: int, argnums: Any, has_aux: Any, mode: Any = "fwd_rev",
            extra: tuple = (), wrt: Any = None) -> Options:
    """Returns the validated, interned options; invalid ones raise the same error every time.

    The memo is keyed on the arguments' types as well as their values, so `argnums=(0, 1.0)`
    or `(0, True)` never matches a cached `(0, 1)`.
    """
    kinds = tuple(map(type, argnums)) if type(argnums) is tuple else type(argnums)
    raw = (api, n_primals, kinds, argnums, type(has_aux), has_aux, type(mode), mode, extra,
           None if wrt is None else (type(wrt), wrt))
    try:
        return _options[raw]
    except (KeyError, TypeError):  # a miss, or an unhashable argument (argnums=np.array(0))
        pass
    name = f"jhvp.{api}"
    _checks.check_choice(mode, _checks.MODES, "mode", name, plural="modes")
    has_aux = _checks.check_has_aux(has_aux, name)
    single = not isinstance(argnums, tuple | list)
    nums = _checks.check_argnums(argnums, n_primals, name)
    key = CallKey(api, nums, single, has_aux, mode, extra, _select.normalise(wrt, single, name))
    with _lock:
        opts = _interned.setdefault(key, Options(key))
        try:
            if len(_options) < _MAX_ENTRIES:
                _options[raw] = opts
        except TypeError:
            pass
    return opts


class Plan:
    """For one (options, structure): which leaves belong to f and which are differentiated.

    Holds counts and masks only (never a structure: f's comes from the running call), and the
    entries compiled for each assignment of roles. `in_diff` marks the leaves of the
    differentiated primals selected by `wrt=` or the frameworks' rules (`_select`); a callable
    `wrt` is applied per call (`leaf_filters`).
    """

    __slots__ = ("in_diff", "n_inputs", "bounds", "leaf_filters", "entries", "refs",
                 "__weakref__")

    def __init__(self, treedef: Any, key: CallKey, leaves: list):
        f_tree, primals_tree, _ = treedef.children()
        bounds = [f_tree.num_leaves]
        in_diff = [False] * f_tree.num_leaves
        filters = []
        for i, tree in enumerate(primals_tree.children()):
            lo = bounds[-1]
            bounds.append(lo + tree.num_leaves)
            if i not in key.argnums:
                in_diff += [False] * tree.num_leaves
                continue
            wrt = key.wrt if key.single or key.wrt is None else key.wrt[key.argnums.index(i)]
            mask = _select.mask(wrt, tree.unflatten(leaves[lo : bounds[-1]]), f"jhvp.{key.api}")
            in_diff += [True] * tree.num_leaves if mask is None else mask
            predicate = _select.leaf_predicate(wrt)
            if predicate is not None:
                filters.append((lo, bounds[-1], predicate))
        self.bounds = (0, *bounds)  # primal i's leaves: bounds[i + 1] .. bounds[i + 2]
        self.in_diff = tuple(in_diff)
        self.n_inputs = len(in_diff)  # leaves of f and the primals; the vectors' follow
        self.leaf_filters = tuple(filters)
        self.entries: dict = {}
        self.refs: list = []  # weakrefs whose death evicts this plan (`lookup`)

    def selected(self, leaves: list) -> tuple:
        """`in_diff` for this call: a callable `wrt` applied to the leaves it covers."""
        if not self.leaf_filters:
            return self.in_diff
        in_diff = list(self.in_diff)
        for lo, hi, predicate in self.leaf_filters:
            for p in range(lo, hi):
                in_diff[p] = in_diff[p] and bool(predicate(leaves[p]))
        return tuple(in_diff)


def _evict(entries: dict, key: Any, _ref: Any = None) -> None:
    # A weakref callback: may run in any thread, during any allocation (dict.pop is atomic), and
    # at interpreter exit, when module globals may be gone (hence `entries` bound in advance, and
    # a key whose __eq__ can no longer run is left for the interpreter to drop).
    try:
        entries.pop(key, None)
    except Exception:  # noqa: BLE001, S110 - nothing to evict into at shutdown
        pass


def lookup(entries: dict, key: Any, make: Callable[[], Any]) -> Any:
    """Returns `entries[key]`, made once by `make()` on a miss (thread-safe).

    Weakly held objects in `key` evict the entry when they die; the entry keeps the weakrefs
    that carry those callbacks (`holder.refs`, or a list kept beside it).
    """
    found = entries.get(key)
    if found is not None:
        return found
    with _lock:
        found = entries.get(key)
        if found is not None:
            return found
        found = make()
        for ref in _filter.weak_referents(key):
            obj = ref()
            if obj is not None:
                found.refs.append(weakref.ref(obj, functools.partial(_evict, entries, key)))
        if len(entries) >= _MAX_ENTRIES:
            entries.pop(next(iter(entries)), None)
        entries[key] = found
        return found


def _plan(opts: Options, treedef: Any, leaves: list) -> Plan:
    if _filter.is_pure(treedef):
        return lookup(opts.plans, treedef, lambda: Plan(treedef, opts.key, leaves))
    key = _filter.structure_key(treedef)
    return lookup(opts.weak_plans, key, lambda: Plan(treedef, opts.key, leaves))


def table(name: str) -> dict:
    """Returns a named table of entries, for programs keyed outside a Plan."""
    with _lock:
        return _tables.setdefault(name, {})


class Slot:
    """The running call's leaves and structure, read by its program while it is traced."""

    __slots__ = ("leaves", "treedef")

    def __init__(self):
        self.leaves: Any = None  # the call's list of leaves while it runs
        self.treedef: Any = None


class Entry:
    """A compiled program and what it needs to run: its slot, its lock, its layout."""

    __slots__ = ("jitted", "slot", "lock", "layout", "selection", "refs", "__weakref__")

    def __init__(self, make_jitted: Callable[[Slot], Callable], layout: Any = None,
                 selection: tuple[int, ...] | None = None):
        self.slot = Slot()
        self.lock = threading.RLock()
        self.layout = layout
        self.selection = selection  # which vector leaves pair with differentiated leaves
        self.refs: list = []
        self.jitted = make_jitted(self.slot)

    def call(self, leaves: list, treedef: Any, *args: Any) -> Any:
        """Runs the program on `args`; `leaves` and `treedef` are visible to its trace."""
        with self.lock:
            slot = self.slot
            slot.leaves, slot.treedef = leaves, treedef
            try:
                return self.jitted(*args)
            finally:
                slot.leaves = slot.treedef = None


class Layout:
    """Where each kind of leaf sits, for one entry (positions and the gradient's structure).

    Attributes:
        dynamic_positions: Flat positions of the traced leaves, in call order.
        diff_positions: Flat positions of the differentiated leaves, in argnums order.
        diff_trees: Per differentiated primal, its structure with None at the static leaves
            (the structure of tangents and results).
        full_trees: Per differentiated primal, its own structure (also accepted for tangents).
    """

    def __init__(self, plan: Plan, roles: tuple, leaves: list, treedef: Any, key: CallKey):
        self.plan = plan
        self.key = key
        diff, dyn = _filter.DIFF, _filter.DYNAMIC
        self.dynamic_positions = tuple(i for i, r in enumerate(roles) if r is diff or r is dyn)
        trees = treedef.children()[1].children()
        bounds = plan.bounds
        diff_trees, full_trees, full_diff = [], [], []
        for i in key.argnums:
            lo, hi = bounds[i + 1], bounds[i + 2]
            masked = [leaves[p] if roles[p] is diff else None for p in range(lo, hi)]
            diff_trees.append(jax.tree.structure(jax.tree.unflatten(trees[i], masked)))
            full_trees.append(trees[i])
            full_diff.append(tuple(p - lo for p in range(lo, hi) if roles[p] is diff))
        self.diff_trees = tuple(diff_trees)
        self.full_trees = tuple(full_trees)
        # Where the differentiated leaves sit in an nnx.State (NNX modules, one argnum only).
        self.state_paths = None
        if key.single:
            i = key.argnums[0]
            primal = trees[i].unflatten(leaves[bounds[i + 1] : bounds[i + 2]])
            self.state_paths = _select.variable_paths(primal, full_diff[0])
        self.diff_counts = tuple(len(ps) for ps in full_diff)
        self.full_diff_positions = tuple(full_diff)
        self.diff_positions = tuple(
            bounds[i + 1] + p for i, ps in zip(key.argnums, full_diff, strict=True) for p in ps
        )
        if key.single:
            self.tangent_trees = (diff_trees[0], full_trees[0])
        else:
            self.tangent_trees = (jax.tree_util.treedef_tuple(self.diff_trees),
                                  jax.tree_util.treedef_tuple(self.full_trees))
        offsets = [0]
        for tree in self.full_trees[:-1]:
            offsets.append(offsets[-1] + tree.num_leaves)
        self.full_selection = tuple(
            off + p for off, ps in zip(offsets, full_diff, strict=True) for p in ps
        )

    def vector_selection(self, vectors_tree: Any) -> tuple[int, ...] | None | Literal[False]:
        """Which vector leaves pair with the differentiated leaves: None (all), or positions.

        Returns False when the vectors' structure is neither accepted form.
        """
        diff_tree, full_tree = self.tangent_trees
        if vectors_tree == diff_tree:
            return None
        if vectors_tree == full_tree:
            return self.full_selection
        return False

    def unflatten_diff(self, flat: list) -> Any:
        """Splits flat differentiated leaves into the per-argnum structure (None at statics)."""
        out, start = [], 0
        for tree, count in zip(self.diff_trees, self.diff_counts, strict=True):
            out.append(jax.tree.unflatten(tree, flat[start : start + count]))
            start += count
        return out[0] if self.key.single else tuple(out)


class Traced:
    """What a program body sees while it is traced: the one hand-off from the cache.

    Attributes:
        key: The call's `CallKey`.
        layout: The entry's `Layout`.
        dynamic: The traced leaves of f and the primals, in call order.
        diff: The differentiated leaves (real floating point; Python floats made arrays).
        vecs: The vectors' leaves paired with `diff`, checked and cast to their dtypes (or None).
    """

    def __init__(self, layout: Layout, leaves: list, treedef: Any, dynamic: list,
                 vecs: list | None = None, name: str | None = None):
        self.key, self.layout, self.api = layout.key, layout, f"jhvp.{layout.key.api}"
        self.dynamic = dynamic
        self._call_leaves = leaves
        leaves = list(leaves)
        for position, x in zip(layout.dynamic_positions, dynamic, strict=True):
            leaves[position] = x
        self._leaves, self._treedef = leaves, treedef
        self.diff = self._differentiated()
        self.vecs = None if vecs is None else self._checked(vecs, name or "tangents")
        self._aux_static: list = []

    def again(self, dynamic: list) -> Traced:
        """The same call with other traced leaves (to trace a second program from them)."""
        return Traced(self.layout, self._call_leaves, self._treedef, dynamic)

    def _differentiated(self) -> list:
        check_differentiable(self.layout, self._leaves, self._treedef, self.api)
        return [jnp.asarray(self._leaves[p]) if isinstance(self._leaves[p], float)
                else self._leaves[p] for p in self.layout.diff_positions]

    def _checked(self, vecs: list, name: str) -> list:
        for p, t in zip(self.diff, vecs, strict=True):
            if jnp.shape(p) != jnp.shape(t) or jnp.issubdtype(jnp.result_type(t),
                                                              jnp.complexfloating):
                _checks.check_tangents(self.unflatten(self.diff), self.unflatten(vecs), name,
                                       self.api)
        return [jnp.asarray(t, dtype=jnp.result_type(p))
                for p, t in zip(self.diff, vecs, strict=True)]

    def rebuild(self, leaves: list) -> tuple:
        """Returns (f, primals, vectors) from a full list of leaves."""
        return self._treedef.unflatten(leaves)

    def substitute(self, d: list) -> tuple[Any, tuple]:
        """Returns (f, primals) with the differentiated leaves replaced by `d`."""
        full = list(self._leaves)
        for p, x in zip(self.layout.diff_positions, d, strict=True):
            full[p] = x
        f, primals, _ = self.rebuild(full)
        return f, primals

    def unflatten(self, flat: list) -> Any:
        """Flat differentiated leaves in the gradient's structure."""
        return self.layout.unflatten_diff(flat)

    def loss(self, d: list) -> tuple[Any, list | None]:
        """The loss: f of the differentiated leaves, as (value, aux arrays); aux's rest is kept."""
        f, primals = self.substitute(d)
        out = f(*primals)
        value = _checks.check_scalar_output(out, self.key.has_aux, self.api)
        if not self.key.has_aux:
            return value, None
        aux_leaves, aux_tree = jax.tree.flatten(out[1])
        arrays = [_filter.is_array(x) for x in aux_leaves]
        self._aux_static[:] = [(aux_tree, tuple(None if a else x
                                                for a, x in zip(arrays, aux_leaves, strict=True)))]
        return value, [x for a, x in zip(arrays, aux_leaves, strict=True) if a]

    def aux(self, aux_arrays: list | None) -> Any:
        """What a program returns for aux: its arrays, and the rest as static data."""
        return (aux_arrays, _filter.Static(self._aux_static[0])) if self.key.has_aux else None


def merge_aux(out_aux: Any) -> Any:
    """Rebuilds aux exactly as f returned it, from a program's `Traced.aux` output."""
    arrays, static = out_aux
    tree, leaves = static.value
    it = iter(arrays)
    return tree.unflatten([next(it) if x is None else x for x in leaves])


_MethodType = types.MethodType


def run(opts: Options, f: Callable, primals: tuple, body: Callable[[Traced], Any],
        vectors: Any = None, name: str | None = None, shardings: bool = False) -> Any:
    """Runs the cached program for this call and returns its output.

    `vectors` and their `name` ("tangents", "cotangents") are given by calls that take vectors;
    `body(traced)` is what the program computes (traced once per entry). `shardings=True`
    (operators) returns `(output, the NamedSharding or None of each differentiated leaf)`.
    """
    key = opts.key
    if name is not None and _select.is_state(vectors):
        return _run_with_state(opts, f, primals, body, vectors, name)
    if type(f) is _MethodType or not callable(f):
        _checks.check_callable(f, f"jhvp.{key.api}")
        f = _filter.as_pytree_callable(f)
    leaves, treedef = _tree_flatten((f, primals, vectors))
    plan = opts.plans.get(treedef) or _plan(opts, treedef, leaves)
    roles, dynamic = _filter.roles(leaves, plan.selected(leaves) if plan.leaf_filters
                                   else plan.in_diff)
    entry = plan.entries.get(roles) or _entry(key, plan, roles, leaves, treedef, body, vectors,
                                              name)
    if name is None:
        out = entry.call(leaves, treedef, dynamic)
        if shardings:
            return out, tuple(_filter.named_sharding(leaves[p])
                              for p in entry.layout.diff_positions)
        return out
    vecs = leaves[plan.n_inputs :]
    if entry.selection is not None:
        vecs = [vecs[i] for i in entry.selection]
    return entry.call(leaves, treedef, dynamic, vecs)


def check_differentiable(layout: Layout, leaves: list, treedef: Any, api: str) -> None:
    """Raises for a non-float differentiated leaf, naming its path and the fix."""
    bounds = layout.plan.bounds
    for position in layout.diff_positions:
        leaf = leaves[position]
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            continue
        i = next(i for i in range(len(bounds) - 2) if bounds[i + 1] <= position < bounds[i + 2])
        _, primals, _ = jax.tree.unflatten(treedef, leaves)
        paths = jax.tree_util.tree_flatten_with_path(primals[i])[0]
        where = f"primals[{i}]{jax.tree_util.keystr(paths[position - bounds[i + 1]][0])}"
        _checks.check_differentiable_leaf(leaf, where, api,
                                          _select.advice(primals[i], position - bounds[i + 1]))


def _entry(key, plan, roles, leaves, treedef, body, vectors, name) -> Entry:
    # A miss: the vectors' structure is checked before the entry exists, so a bad structure
    # raises on every call.
    layout = Layout(plan, roles, leaves, treedef, key)
    selection: tuple[int, ...] | None = None
    if name is not None:
        found = layout.vector_selection(treedef.children()[2])
        if found is False:  # neither accepted structure
            # An integer leaf among the differentiated ones explains a mismatch best: tangents
            # usually leave it out (or hold None there).
            check_differentiable(layout, leaves, treedef, f"jhvp.{key.api}")
            diff = [leaves[p] for p in layout.diff_positions]
            _checks.check_tangents(layout.unflatten_diff(diff), vectors, name, f"jhvp.{key.api}")
            raise AssertionError("unreachable: check_tangents accepted a bad structure")
        selection = found

    def make_jitted(slot: Slot) -> Callable:
        def program(dynamic: list, vecs: list | None = None):
            return body(Traced(layout, slot.leaves, slot.treedef, dynamic, vecs, name))

        program.__name__ = program.__qualname__ = f"jhvp_{key.api}_{key.mode}"
        return jax.jit(program)

    return lookup(plan.entries, roles, lambda: Entry(make_jitted, layout, selection))


def _run_with_state(opts: Options, f: Callable, primals: tuple, body: Callable, state: Any,
                    name: str) -> Any:
    """A call whose vectors are an nnx.State (what nnx.grad returns): its output, as one too."""
    key = opts.key
    if not key.single:
        raise TypeError(
            f"jhvp.{key.api}: `{name}` may be an nnx.State only with a single int `argnums`; "
            "pass module-shaped vectors (the structure of the differentiated arguments)."
        )
    # Run once in the full-structure form (the module itself as the vector) to find the layout.
    primal = primals[key.argnums[0]]
    leaves, treedef = _tree_flatten((_filter.as_pytree_callable(f), primals, primal))
    plan = opts.plans.get(treedef) or _plan(opts, treedef, leaves)
    roles, dynamic = _filter.roles(leaves, plan.selected(leaves))
    entry = plan.entries.get(roles) or _entry(key, plan, roles, leaves, treedef, body, primal,
                                              name)
    layout = entry.layout
    if layout.state_paths is None:
        raise TypeError(f"jhvp.{key.api}: `{name}` is an nnx.State, but the differentiated "
                        "argument is not an NNX module.")
    try:
        vecs = jax.tree.leaves(_select.from_state(state, layout.diff_trees[0],
                                                  layout.state_paths))
    except ValueError as err:
        raise ValueError(f"jhvp.{key.api}: `{name}`: {err}") from None
    out = entry.call(leaves, treedef, dynamic, vecs)
    to_state = functools.partial(_select.to_state, like_state=state, paths=layout.state_paths)
    if key.api == "value_grad_hvp":
        value, grad, hv, aux = out
        return value, to_state(grad), to_state(hv), aux
    hv, aux = out
    return to_state(hv), aux


def cache_size() -> int:
    """Returns the number of cached programs (for tests and diagnostics)."""
    opts = list(_interned.values())
    plans = [p for o in opts for table in (o.plans, o.weak_plans) for p in list(table.values())]
    return sum(len(p.entries) for p in plans) + sum(len(t) for t in list(_tables.values()))
