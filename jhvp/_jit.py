"""The cache of compiled top-level functions, keyed on the user's f and held weakly.

`jax.jit` caches compilations per Python function object. Each public call builds its
transformation of the user's `f` (for argnums, has_aux, mode), so the wrapper must be built once
per f and reused, or every call would trace f again. The wrapper refers to f only through a weak
reference and the cache holds f only as a weak key, so dropping f frees its entries, its traces
and its executables; a loop passing a fresh lambda each time therefore keeps the cache bounded.
"""

from __future__ import annotations

import inspect
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

# owner (f, or a bound method's __self__) -> {(method function or None, key): jitted}
_weak_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Callables that cannot be weakly referenced (rare: some builtins, __slots__ objects) are held
# strongly, in a small LRU, so the cache stays bounded.
_strong_cache: OrderedDict = OrderedDict()
_STRONG_CACHE_SIZE = 64


def _split(f: Callable) -> tuple[Any, Any]:
    # A bound method is created anew at each attribute access, so it cannot be a weak key itself:
    # key on the object it is bound to, and on the plain function.
    if inspect.ismethod(f):
        return f.__self__, f.__func__
    return f, None


def _resolver(owner: Any, func: Any, weak: bool) -> Callable[[], Callable]:
    if not weak:
        return (lambda: owner) if func is None else (lambda: func.__get__(owner))
    ref = weakref.ref(owner)
    if func is None:
        return ref
    return lambda: func.__get__(ref())


def cached(f: Callable, key: Hashable, build: Callable[[Callable[[], Callable]], Callable]):
    """Returns `build(get_f)`, built once per (f, key); `get_f()` returns f while it lives.

    `build` must not capture f itself, only `get_f`, or the cache would keep f alive.
    """
    owner, func = _split(f)
    try:
        entries = _weak_cache.get(owner)
        weak = True
    except TypeError:  # unhashable owner
        entries, weak = None, False
    if weak and entries is not None:
        hit = entries.get((func, key))
        if hit is not None:
            return hit
    if weak:
        try:
            weakref.ref(owner)
        except TypeError:
            weak = False
    if weak:
        jitted = build(_resolver(owner, func, weak=True))
        _weak_cache.setdefault(owner, {})[(func, key)] = jitted
        return jitted
    strong_key = (id(owner), func, key)
    hit = _strong_cache.get(strong_key)
    if hit is not None:
        _strong_cache.move_to_end(strong_key)
        return hit[1]
    jitted = build(_resolver(owner, func, weak=False))
    _strong_cache[strong_key] = (owner, jitted)
    if len(_strong_cache) > _STRONG_CACHE_SIZE:
        _strong_cache.popitem(last=False)
    return jitted


def cache_size() -> int:
    """Returns the number of cached compiled wrappers (for tests and diagnostics)."""
    return sum(len(v) for v in list(_weak_cache.values())) + len(_strong_cache)
