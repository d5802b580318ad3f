"""The compile cache: one jitted program per compile key, never wrong, never keeping f alive.

A key is a `CallKey` (which public function, argnums, has_aux, mode, ...) plus the treedefs and
static leaves of f and the primals (`_filter.split`). Static leaves are held weakly where they can
be (`_filter.static_key`); when one dies, a weakref callback evicts its entry, and with it the
traces and executables. The jitted program never captures the static leaves: while it is traced,
it reads the current call's leaves from its entry (`Entry.call` sets them under the entry's lock),
so no user object outlives its last call through the cache. A lock per entry makes concurrent
first calls trace once; a global lock makes concurrent misses build one entry.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

from . import _filter

# Beyond this many entries the oldest is dropped: keys whose treedefs hold a fresh object per call
# (a new lambda inside a Partial, say) cannot be evicted by a weakref callback.
_MAX_ENTRIES = 4096


@dataclasses.dataclass(frozen=True, eq=False)
class CallKey:
    """The options of a call, after validation. Interned: equal options are the same object."""

    api: str
    argnums: tuple[int, ...] = ()
    single: bool = True
    has_aux: bool = False
    mode: str = "fwd_rev"
    extra: tuple = ()

    plans: dict = dataclasses.field(default_factory=dict, repr=False)
    """The `Plan` of each structure called with these options, by treedef."""

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def of(api: str, argnums: tuple = (), single: bool = True, has_aux: bool = False,
           mode: str = "fwd_rev", extra: tuple = ()) -> CallKey:
        """Returns the interned key (identity hashing keeps the per-call lookup cheap)."""
        return CallKey(api, argnums, single, has_aux, mode, extra)


class Entry:
    """A cached jitted program and what it needs to run: its lock and its layout."""

    __slots__ = ("jitted", "lock", "leaves", "layout", "selection", "_refs", "__weakref__")

    def __init__(self, layout: Any = None, selection: tuple[int, ...] | None = None):
        self.jitted: Callable | None = None
        self.selection = selection  # which vector leaves pair with differentiated leaves
        self.lock = threading.RLock()
        self.leaves: list | None = None  # the running call's leaves, read while tracing
        self.layout = layout
        self._refs: list = []

    def call(self, leaves: list, *args):
        """Runs the program on `args`; `leaves` are visible to its trace as `self.leaves`."""
        with self.lock:
            self.leaves = leaves
            try:
                return self.jitted(*args)
            finally:
                self.leaves = None


_lock = threading.Lock()
_keys: set = set()  # the CallKeys that hold plans
_tables: dict = {}  # name -> entries, for callers without a Plan (jhvp.compat)


def _evict(entries: dict, key: Any, _ref: Any = None) -> None:
    # A weakref callback: may run in any thread, during any allocation (dict.pop is atomic), and
    # at interpreter exit, when module globals may be gone (hence `entries` bound in advance).
    entries.pop(key, None)


def plan(key: CallKey, treedef: Any) -> _filter.Plan:
    """Returns the `Plan` for these options and this structure, made once (thread-safe)."""
    plans = key.plans
    found = plans.get(treedef)
    if found is not None:
        return found
    with _lock:
        found = plans.get(treedef)
        if found is None:
            if len(plans) >= _MAX_ENTRIES:
                plans.pop(next(iter(plans)), None)
            found = plans[treedef] = _filter.Plan(treedef, key.argnums)
            _keys.add(key)
        return found


def table(name: str) -> dict:
    """Returns a named table of entries, for callers keyed without a Plan."""
    with _lock:
        return _tables.setdefault(name, {})


def lookup(entries: dict, key: Any, make: Callable[[], Entry]) -> Entry:
    """Returns `entries[key]`, made once by `make()` on a miss (thread-safe).

    Weakly held static leaves in `key` evict the entry when they die.
    """
    entry = entries.get(key)
    if entry is not None:
        return entry
    with _lock:
        entry = entries.get(key)
        if entry is not None:
            return entry
        entry = make()
        for ref in _filter.weak_referents(key):
            obj = ref()
            if obj is not None:
                entry._refs.append(weakref.ref(obj, functools.partial(_evict, entries, key)))
        if len(entries) >= _MAX_ENTRIES:
            entries.pop(next(iter(entries)), None)
        entries[key] = entry
        return entry


def cache_size() -> int:
    """Returns the number of cached programs (for tests and diagnostics)."""
    plans = [p for key in list(_keys) for p in list(key.plans.values())]
    tables = list(_tables.values())
    return sum(len(p.entries) for p in plans) + sum(len(t) for t in tables)
