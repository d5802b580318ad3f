"""THE filter: which leaves of a pytree are traced arrays, and how the rest enters a compile key.

Every entry point splits what the user passes the same way (the Equinox convention). Array leaves
(JAX and NumPy arrays, NumPy scalars) are traced; in the differentiated primals Python floats are
too. Every other leaf (callables, None, strings, ints, objects) is static: it enters the compile
key through `static_key`, by value for plain values, weakly by hash or identity for objects, so
no cache of jhvp keeps a user's object alive. A tree structure that holds objects in its node
data (a `Partial`'s function, an Equinox module's static fields) enters a key through
`structure_key`, with the same weak references.

`partition` and `combine` split a whole pytree (an operator, a callable) into its arrays and a
hashable, weakly held static part and put it back together; `roles` is the native API's per-call
form of the same split, written as a flat loop because it runs on every call.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.core import Tracer

ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)
_VALUE_TYPES = frozenset({int, float, bool, str, bytes, complex, type(None)})
# Node data made only of these is safe to hold in a key: it owns no user object.
_PURE_TYPES = (type(None), bool, int, float, str, bytes, type, jax.tree_util.PyTreeDef)


def named_sharding(x: Any) -> jax.sharding.NamedSharding | None:
    """The `NamedSharding` of a concrete array spread over more than one device, else None.

    Traced arrays (inside a user's `jax.jit`) have none: there XLA's sharding propagation lays
    out what is computed from them.
    """
    if isinstance(x, jax.Array) and not isinstance(x, Tracer):
        sharding = x.sharding
        if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1:
            return sharding
    return None


def is_array(x: Any) -> bool:
    """Whether a leaf is traced: a JAX or NumPy array, a NumPy scalar, a tracer."""
    return isinstance(x, ARRAY_TYPES)


class _WeakId:
    """An unhashable object as a key: by identity, weakly held."""

    __slots__ = ("ref", "ident", "__weakref__")

    def __init__(self, obj: Any):
        self.ref = weakref.ref(obj)
        self.ident = id(obj)

    def __hash__(self) -> int:
        return self.ident

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _WeakId):
            return NotImplemented
        obj = self.ref()
        return obj is not None and obj is other.ref()

    def value(self) -> Any:
        return self.ref()


class _MethodKey:
    """A bound method of a plain object: the object by identity (weakly), the function itself."""

    __slots__ = ("self_ref", "func", "ident")

    def __init__(self, method: types.MethodType):
        self.self_ref = weakref.ref(method.__self__)
        self.func = method.__func__
        self.ident = id(method.__self__)

    def __hash__(self) -> int:
        return hash((self.ident, self.func))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _MethodKey):
            return NotImplemented
        obj = self.self_ref()
        return obj is not None and obj is other.self_ref() and self.func is other.func

    def value(self) -> Any:
        obj = self.self_ref()
        return None if obj is None else types.MethodType(self.func, obj)


class _StrongId:
    """An object that can be neither hashed nor weakly referenced: by identity, held strongly."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _StrongId) and self.obj is other.obj

    def value(self) -> Any:
        return self.obj


def static_key(x: Any) -> Any:
    """Returns the compile-key form of a static leaf (see the module docstring)."""
    t = type(x)
    if t in _VALUE_TYPES:
        return (t, x)  # 1, 1.0 and True hash alike but must not share a trace
    if t is types.MethodType:
        try:
            return _MethodKey(x)
        except TypeError:  # its object cannot be weakly referenced
            return _StrongId(x)
    if t is tuple or t is list:
        return (t, tuple(static_key(y) for y in x))
    try:
        ref = weakref.ref(x)
    except TypeError:
        try:
            hash(x)
        except TypeError:
            return _StrongId(x)
        return (t, x)
    try:
        hash(ref)
    except TypeError:
        return _WeakId(x)
    return ref


def static_value(key: Any) -> Any:
    """The leaf a `static_key` stands for (None once a weakly held object has died)."""
    if isinstance(key, weakref.ref):
        return key()
    if isinstance(key, _WeakId | _MethodKey | _StrongId):
        return key.value()
    t, x = key
    if (t is tuple or t is list) and type(x) is tuple:
        return t(static_value(y) for y in x)
    return x


def weak_referents(key: Any) -> list:
    """The weak references inside a compile key, nested tuples included (their death evicts it)."""
    if isinstance(key, weakref.ref):
        return [key]
    if isinstance(key, _WeakId):
        return [key.ref]
    if isinstance(key, _MethodKey):
        return [key.self_ref]
    if type(key) is tuple:
        return [ref for part in key for ref in weak_referents(part)]
    return []


def _pure(data: Any) -> bool:
    if isinstance(data, _PURE_TYPES):
        return True
    if type(data) in (tuple, list, frozenset):
        return all(_pure(x) for x in data)
    return False


def is_pure(treedef: Any) -> bool:
    """Whether a structure's node data owns no object (dict keys, field names, classes only)."""
    data = treedef.node_data()
    if data is None:
        return True
    return _pure(data[1]) and all(is_pure(c) for c in treedef.children())


def structure_key(treedef: Any) -> Any:
    """A structure as a compile key: itself when pure, else its node data weakly held."""
    if is_pure(treedef):
        return treedef
    return _weak_structure(treedef)


def _weak_structure(treedef: Any) -> Any:
    data = treedef.node_data()
    if data is None:
        return None
    return (data[0], static_key(data[1]), tuple(_weak_structure(c) for c in treedef.children()))


def as_pytree_callable(f: Callable) -> Any:
    """A bound method whose object is a pytree becomes a `Partial`, so its arrays are traced."""
    if type(f) is types.MethodType:
        owner = f.__self__
        if not jax.tree_util.treedef_is_leaf(jax.tree.structure(owner)):
            return jax.tree_util.Partial(f.__func__, owner)
    return f


class Static:
    """A pytree with no leaves that carries static data in its structure (aux, operator metadata).

    Returned from jitted programs for non-array outputs. Compared by value where it can be hashed,
    by identity otherwise.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        try:
            return hash(self.value)
        except TypeError:
            return id(self.value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Static):
            return NotImplemented
        if self.value is other.value:
            return True
        try:
            hash(self.value), hash(other.value)
            return type(self.value) is type(other.value) and bool(self.value == other.value)
        except Exception:  # noqa: BLE001 - an __eq__ that cannot answer means "different"
            return False

    def __repr__(self) -> str:
        return f"Static({self.value!r})"


jax.tree_util.register_pytree_node(Static, lambda s: ((), s.value), lambda value, _: Static(value))


def partition(tree: Any) -> tuple[list, Any, list, tuple]:
    """Splits a pytree into its arrays and a hashable, weakly held key for everything else.

    Returns (leaves, treedef, arrays, key): `arrays` has the array leaves and None elsewhere;
    `key` holds the structure (`structure_key`) and the static leaves (`static_key`). A plain
    function or method is a pytree of one static leaf.
    """
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [x if is_array(x) else None for x in leaves]
    static = tuple(None if is_array(x) else static_key(x) for x in leaves)
    return leaves, treedef, arrays, (structure_key(treedef), static)


def combine(dynamic: list, leaves: list, treedef: Any) -> Any:
    """Rebuilds a pytree from `treedef`, its leaves, and traced arrays where `dynamic` has them."""
    return treedef.unflatten([x if d is None else d for x, d in zip(leaves, dynamic, strict=True)])


# ---- the native API's per-call split ----------------------------------------------------------


class _Role:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


DIFF = _Role("DIFF")  # a differentiated leaf (traced, with a tangent)
DYNAMIC = _Role("DYNAMIC")  # a traced leaf held fixed (data, f's arrays)

# Concrete array types seen so far (JAX's array class joins on first sight: naming it would need a
# private import, and making an array at import time would start the backend too early for
# `jax.distributed.initialize`). Tracers are never added: their roles are the same, but slower.
_FAST_ARRAY_TYPES = {np.ndarray}


def roles(leaves: list, in_diff: tuple) -> tuple[tuple, list]:
    """Each leaf's role (DIFF, DYNAMIC, or its static key), and the traced leaves in order.

    Only the leaves of f and the primals (the first `len(in_diff)`) are looked at.
    """
    # The per-call hot path: a plain loop, the common types tested first.
    out: list[Any] = []  # roles, or weak references / static keys of the other leaves
    dynamic: list = []
    fast, function = _FAST_ARRAY_TYPES, types.FunctionType
    for leaf, differentiated in zip(leaves, in_diff):  # noqa: B905 - in_diff covers f, primals
        t = type(leaf)
        if t in fast:
            out.append(DIFF if differentiated else DYNAMIC)
            dynamic.append(leaf)
        elif t is function:
            out.append(weakref.ref(leaf))  # hashable by identity, weakly held
        elif isinstance(leaf, ARRAY_TYPES):
            out.append(DIFF if differentiated else DYNAMIC)
            dynamic.append(leaf)
            if isinstance(leaf, jax.Array) and not isinstance(leaf, Tracer):
                fast.add(t)
        elif differentiated and (t is float or t is complex):
            out.append(DIFF)  # as jax.grad does; complex ones are rejected when traced
            dynamic.append(leaf)
        else:
            out.append(static_key(leaf))
    return tuple(out), dynamic
