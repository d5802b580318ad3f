"""Splitting f and the primals into traced arrays and static leaves (the Equinox convention).

In the differentiated primals, floating-point arrays and Python floats are differentiated and every
other leaf (callables, None, strings, ints, objects) is static. In the other primals and in a
pytree-valued f (a `jax.tree_util.Partial`, an Equinox module, a bound method of a pytree), array
leaves are traced arguments and every other leaf is static. Static leaves enter the compile key
through `static_key`: by value for plain values, by hash through a weak reference for other
hashable objects, by identity (weakly) for unhashable ones, so the cache never keeps them alive.
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


class _Role:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


DIFF = _Role("DIFF")  # a differentiated leaf (traced, with a tangent)
DYNAMIC = _Role("DYNAMIC")  # a traced leaf held fixed (data, f's arrays)


def is_array(x: Any) -> bool:
    """Whether a leaf is traced (JAX and NumPy arrays, NumPy scalars, tracers)."""
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

    def referents(self) -> tuple:
        return (self.ref,)


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

    def referents(self) -> tuple:
        return (self.self_ref,)


class _StrongId:
    """An object that can be neither hashed nor weakly referenced: by identity, held strongly."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _StrongId) and self.obj is other.obj


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


def weak_referents(key: tuple) -> list:
    """The weak references inside a compile key, nested tuples included (their death evicts it)."""
    refs = []
    for part in key:
        if isinstance(part, weakref.ref):
            refs.append(part)
        elif isinstance(part, _WeakId | _MethodKey):
            refs.extend(part.referents())
        elif type(part) is tuple:
            refs.extend(weak_referents(part))
    return refs


def as_pytree_callable(f: Callable) -> Any:
    """A bound method whose object is a pytree becomes a `Partial`, so its arrays are traced."""
    if type(f) is types.MethodType:
        owner = f.__self__
        if not jax.tree_util.treedef_is_leaf(jax.tree.structure(owner)):
            return jax.tree_util.Partial(f.__func__, owner)
    return f


def flatten(f: Callable, primals: tuple, vectors: Any = None) -> tuple[list, Any]:
    """Flattens (f, primals, vectors) in one pass: (leaves, treedef); vectors' leaves last."""
    return jax.tree_util.tree_flatten((as_pytree_callable(f), primals, vectors))


class Plan:
    """For one (options, treedef): which leaves are f's and which sit in differentiated primals.

    Made once per structure and compared by identity, so a warm call hashes its treedef once.
    Holds the compiled entries for each assignment of roles (`entries`).
    """

    __slots__ = ("treedef", "trees", "bounds", "in_diff", "vectors_tree", "entries", "__weakref__")

    def __init__(self, treedef: Any, argnums: tuple[int, ...]):
        f_tree, primals_tree, self.vectors_tree = treedef.children()
        self.treedef = treedef
        self.trees = (f_tree, *primals_tree.children())
        bounds = [f_tree.num_leaves]
        for tree in self.trees[1:]:
            bounds.append(bounds[-1] + tree.num_leaves)
        self.bounds = tuple(bounds)  # primal i's leaves: bounds[i] .. bounds[i + 1]
        in_diff = [False] * f_tree.num_leaves
        for i, tree in enumerate(self.trees[1:]):
            in_diff += [i in argnums] * tree.num_leaves
        self.in_diff = tuple(in_diff)
        self.entries: dict = {}


# Concrete array types seen so far (JAX's array class joins on first sight: naming it would need a
# private import, and making an array at import time would start the backend too early for
# `jax.distributed.initialize`). Tracers are never added: their roles are the same, but slower.
_FAST_ARRAY_TYPES = {np.ndarray}


def roles(leaves: list, in_diff: tuple) -> tuple[tuple, list]:
    """Each leaf's role (DIFF, DYNAMIC, or its static key), and the traced leaves in order.

    Only the leaves of f and the primals (the first `len(in_diff)`) are looked at.
    """
    # The per-call hot path: a plain loop, the common types tested first.
    out, dynamic = [], []
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


class Layout:
    """Where each kind of leaf sits, for one compile key; built once per cache entry.

    Attributes:
        plan: The structure's `Plan` (treedefs of f and of each primal, leaf bounds).
        dynamic_positions: Flat positions of the traced leaves, in call order.
        diff_positions: Flat positions of the differentiated leaves, in argnums order.
        diff_trees: Per differentiated primal, its treedef with None at the static leaves
            (the structure of tangents and results).
        full_trees: Per differentiated primal, its own treedef (also accepted for tangents).
    """

    def __init__(self, plan: Plan, roles: tuple, leaves: list, argnums: tuple[int, ...]):
        self.plan = plan
        self.n_inputs = len(plan.in_diff)  # leaves of f and the primals; the vectors' follow
        self.rebuild_tree = jax.tree_util.treedef_tuple(
            (plan.trees[0], jax.tree_util.treedef_tuple(plan.trees[1:]))
        )
        self.argnums = argnums
        self.dynamic_positions = tuple(
            i for i, r in enumerate(roles) if r is DIFF or r is DYNAMIC
        )
        bounds, trees = (0, *plan.bounds), plan.trees[1:]
        self.bounds = bounds  # primal i's leaves: bounds[i + 1] .. bounds[i + 2]
        diff_trees, full_trees, diff_counts, full_diff = [], [], [], []
        for i in argnums:
            lo, hi = bounds[i + 1], bounds[i + 2]
            masked = [leaves[p] if roles[p] is DIFF else None for p in range(lo, hi)]
            diff_trees.append(jax.tree.structure(jax.tree.unflatten(trees[i], masked)))
            full_trees.append(trees[i])
            full_diff.append(tuple(p - lo for p in range(lo, hi) if roles[p] is DIFF))
            diff_counts.append(len(full_diff[-1]))
        self.diff_trees = tuple(diff_trees)
        self.full_trees = tuple(full_trees)
        self.diff_counts = tuple(diff_counts)
        self.full_diff_positions = tuple(full_diff)
        self.diff_positions = tuple(
            bounds[i + 1] + p for i, ps in zip(argnums, full_diff, strict=True) for p in ps
        )
        self.tangent_trees = {
            True: (diff_trees[0], full_trees[0]) if len(argnums) == 1 else (None, None),
            False: (
                jax.tree_util.treedef_tuple(self.diff_trees),
                jax.tree_util.treedef_tuple(self.full_trees),
            ),
        }
        offsets, start = [], 0
        for tree in self.full_trees:
            offsets.append(start)
            start += tree.num_leaves
        self.full_selection = tuple(
            off + p for off, ps in zip(offsets, full_diff, strict=True) for p in ps
        )

    def vector_selection(self, single: bool) -> tuple[int, ...] | None:
        """Which of the vectors' leaves pair with the differentiated leaves (None: all of them).

        Returns False when the vectors' structure is neither accepted form.
        """
        diff_tree, full_tree = self.tangent_trees[single]
        tree = self.plan.vectors_tree
        if tree == diff_tree:
            return None
        if tree == full_tree:
            return self.full_selection
        return False

    def primal_leaves(self, leaves: list, i: int) -> tuple[int, list]:
        """Primal i's offset in the flat leaves, and its leaves."""
        lo, hi = self.bounds[i + 1], self.bounds[i + 2]
        return lo, leaves[lo:hi]

    def rebuild(self, leaves: list) -> tuple[Callable, tuple]:
        """Returns (f, primals) from the flat leaves of f and the primals."""
        return self.rebuild_tree.unflatten(leaves[: self.n_inputs])

    def unflatten_diff(self, flat: list, single: bool) -> Any:
        """Splits flat differentiated leaves into the per-argnum structure (None at statics)."""
        out, start = [], 0
        for tree, count in zip(self.diff_trees, self.diff_counts, strict=True):
            out.append(tree.unflatten(flat[start : start + count]))
            start += count
        return out[0] if single else tuple(out)


class Static:
    """Static data carried in a pytree's structure rather than its leaves (no arrays inside).

    Returned from jitted programs for non-array outputs (aux), and stored in operators. Compared by
    value where it can be hashed, by identity otherwise.
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
        except TypeError:
            return False
        return bool(self.value == other.value)

    def __repr__(self) -> str:
        return f"Static({self.value!r})"


jax.tree_util.register_pytree_node(Static, lambda s: ((), s.value), lambda value, _: Static(value))
