"""Vectors with the operator's structure: the leaf-by-leaf algebra every algorithm runs on.

A vector is a pytree with the structure of the operator's input (`_protocol.TreeOperator`), all
leaves in its dtype; a *stack* of vectors (a Lanczos basis, a batch of probes, a sketch) is the
same pytree with leading axes on every leaf. No vector is ever concatenated into one flat
array: a leaf keeps its shape, and so the sharding the parameters give it (on one device, a
probe's random words, 1/32 of a vector, are drawn concatenated: `_one_program_words`). Dot
products, Gram matrices and linear combinations run leaf by leaf and sum the leaves'
contributions, and XLA inserts the reductions across devices; only the small results (scalars,
s × s matrices) are replicated.
New vectors (zeros, random starts, probes) are laid out with the structure's shardings where
they are known (`_protocol.named_sharding`); inside a user's `jax.jit` XLA propagates them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from .._protocol import TreeOperator
from .._typing import PyTree

# Dot products and reorthogonalisation must be exact to working precision: TF32 or bf16
# passes on accelerators (the default for float32 matmuls on some) would leave a basis
# orthogonal to 1e-3 only.
HIGHEST = jax.lax.Precision.HIGHEST


def constrain(op: TreeOperator, tree: PyTree, lead: int = 0) -> PyTree:
    """Lays out each leaf (with `lead` leading axes, replicated) like the structure's leaf."""

    def one(x, s):
        sharding = getattr(s, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return x
        spec = PartitionSpec(*([None] * lead), *sharding.spec)
        return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))

    return jax.tree.map(one, tree, op.struct)


def zeros(op: TreeOperator, lead: tuple[int, ...] = (), dtype: Any = None) -> PyTree:
    """A zero vector, or a zero stack with leading axes `lead`, laid out like the parameters."""
    dtype = op.dtype if dtype is None else dtype
    tree = jax.tree.map(lambda s: jnp.zeros((*lead, *s.shape), dtype), op.struct)
    return constrain(op, tree, len(lead))


def _leaf_key_list(op: TreeOperator, key: jax.Array) -> list[jax.Array]:
    """Leaf l's key, `fold_in(key, l)`, for every leaf: one vmapped fold_in, the same keys."""
    count = len(jax.tree.leaves(op.struct))
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(count, dtype=jnp.uint32))
    return [keys[i] for i in range(count)]


def _leaf_keys(op: TreeOperator, key: jax.Array) -> PyTree:
    return jax.tree.unflatten(jax.tree.structure(op.struct), _leaf_key_list(op, key))


def normal(op: TreeOperator, key: jax.Array, dtype: Any = None) -> PyTree:
    """A standard normal vector: leaf l drawn from `fold_in(key, l)`."""
    dtype = op.dtype if dtype is None else dtype
    tree = jax.tree.map(lambda k, s: jax.random.normal(k, s.shape, dtype),
                        _leaf_keys(op, key), op.struct)
    return constrain(op, tree)


def _word_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    full = shape if shape else (1,)
    return (*full[:-1], -(-full[-1] // 32))


def _one_program_words(keys: list[jax.Array], shapes: list[tuple[int, ...]]) -> list | None:
    """`jax.random.bits(keys[l], _word_shape(shapes[l]))` for every l, in one threefry call.

    Per leaf, each draw is a loop of its own in the compiled program (compilation is most of
    a first call). With JAX's default partitionable threefry, word w of a draw is the threefry
    hash of the counter w (below 2³²) under its key, so all leaves' words come from one hash
    of their concatenation, each with its leaf's key: the same bits (a test compares them).
    Only on one device (a concatenation would be replicated across devices) and for threefry
    keys; None where that does not hold.
    """
    key = keys[0]
    if (jax.device_count() != 1 or not getattr(jax.config, "jax_threefry_partitionable", False)
            or not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            or str(jax.random.key_impl(key)) != "threefry2x32"):
        return None
    words = [_word_shape(s) for s in shapes]
    sizes = [int(np.prod(w, dtype=np.int64)) for w in words]
    starts = np.cumsum([0, *sizes[:-1]])
    total = int(sum(sizes))
    if total >= 2**31:
        return None
    data = jnp.stack([jax.random.key_data(k) for k in keys])  # (L, 2)
    index = jax.lax.iota(jnp.int32, total)
    owner = jnp.zeros(total, jnp.int32)
    for start in starts[1:]:
        owner = owner + (index >= jnp.int32(start)).astype(jnp.int32)
    counter = (index - jnp.asarray(starts, jnp.int32)[owner]).astype(jnp.uint32)
    k1, k2 = data[owner, 0], data[owner, 1]
    b1, b2 = jax.extend.random.threefry2x32_p.bind(k1, k2, jnp.zeros_like(counter), counter)
    flat = b1 ^ b2
    return [flat[int(a):int(a) + n].reshape(w)
            for a, n, w in zip(starts, sizes, words, strict=True)]


def _signs(bits: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    # One random 32-bit word gives 32 signs: 32x fewer random bits than
    # `jax.random.rademacher`, measured 11x slower for 99 probes of size 1e4. The words are
    # split into bytes and unpacked there, so what XLA may hold between unpacking and use is
    # one byte per sign, a quarter of a vector (a 32-bit word per sign was a whole vector per
    # probe in flight). The words run along the last axis, so the leading axes (where
    # parameters are usually sharded) stay.
    full = shape if shape else (1,)
    words = bits.shape[-1]
    octets = jax.lax.bitcast_convert_type(bits, jnp.uint8)  # (..., words, 4)
    shifts = jnp.arange(8, dtype=jnp.uint8).reshape((1,) * (len(full) + 1) + (8,))
    unpacked = (octets[..., None] >> shifts) & jnp.uint8(1)  # (..., words, 4, 8)
    signs = unpacked.reshape((*full[:-1], words * 32))[..., : full[-1]].reshape(shape)
    return jnp.asarray(1, dtype) - jnp.asarray(2, dtype) * signs.astype(dtype)


def rademacher(op: TreeOperator, key: jax.Array, i: Any, dtype: Any = None) -> PyTree:
    """Probe i: independent ±1 signs, leaf l drawn from `fold_in(fold_in(key, i), l)`.

    A function of `key` and `i` alone, so how probes are batched never changes them.
    """
    dtype = op.dtype if dtype is None else dtype
    leaves, tree = jax.tree.flatten(op.struct)
    shapes = [tuple(s.shape) for s in leaves]
    keys = _leaf_key_list(op, jax.random.fold_in(key, i))
    words = _one_program_words(keys, shapes)
    if words is None:
        words = [jax.random.bits(k, _word_shape(s), jnp.uint32)
                 for k, s in zip(keys, shapes, strict=True)]
    signs = [_signs(w, s, dtype) for w, s in zip(words, shapes, strict=True)]
    return constrain(op, jax.tree.unflatten(tree, signs))


def _sum(parts: list, out: Any) -> jax.Array:
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total.astype(out)


def _contract(a: jax.Array, b: jax.Array, lead_a: int, lead_b: int, out: Any) -> jax.Array:
    """Contracts the trailing (vector) axes of a and b: result a's leading, then b's leading."""
    rest_a = tuple(range(lead_a, a.ndim))
    rest_b = tuple(range(lead_b, b.ndim))
    return jax.lax.dot_general(a, b.astype(a.dtype), ((rest_a, rest_b), ((), ())),
                               precision=HIGHEST, preferred_element_type=out)


def dot(a: PyTree, b: PyTree, out: Any) -> jax.Array:
    """aᵀb for two vectors, computed from a's dtype (b rounded to it), accumulated in `out`.

    A low-precision vector is exact to its own rounding only, so a float32 copy of it would
    cost memory and buy no accuracy.
    """
    return _sum(jax.tree.leaves(jax.tree.map(lambda x, y: _contract(x, y, 0, 0, out), a, b)),
                out)


def norm(a: PyTree, out: Any) -> jax.Array:
    """‖a‖, accumulated in `out`."""
    return jnp.sqrt(dot(a, a, out))


def coefficients(stack: PyTree, w: PyTree, out: Any) -> jax.Array:
    """(m,): the dot products of each vector of a stack (one leading axis) with w."""
    return _sum(jax.tree.leaves(jax.tree.map(lambda x, y: _contract(x, y, 1, 0, out), stack, w)),
                out)


def gram(a: PyTree, b: PyTree, out: Any) -> jax.Array:
    """(s, t): the dot products of the vectors of two stacks (one leading axis each)."""
    return _sum(jax.tree.leaves(jax.tree.map(lambda x, y: _contract(x, y, 1, 1, out), a, b)),
                out)


def row_dots(a: PyTree, b: PyTree, out: Any) -> jax.Array:
    """(s,): a_i·b_i for the vectors of two stacks of the same length."""

    def one(x, y):
        rest = tuple(range(1, x.ndim))
        return jax.lax.dot_general(x, y.astype(x.dtype), ((rest, rest), ((0,), (0,))),
                                   precision=HIGHEST, preferred_element_type=out)

    return _sum(jax.tree.leaves(jax.tree.map(one, a, b)), out)


def combine(c: jax.Array, stack: PyTree, out: Any) -> PyTree:
    """Σ_a c[..., a] stack[a]: a vector for c of shape (m,), a stack of k for c of shape (k, m)."""

    def one(x):
        return jax.lax.dot_general(c.astype(x.dtype), x, (((c.ndim - 1,), (0,)), ((), ())),
                                   precision=HIGHEST, preferred_element_type=out)

    return jax.tree.map(one, stack)


def scale_rows(stack: PyTree, c: jax.Array) -> PyTree:
    """Each vector stack[i] times c[i]."""
    return jax.tree.map(lambda x: x * jnp.asarray(c, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)),
                        stack)


def row(stack: PyTree, j: jax.Array) -> PyTree:
    """The vector stack[j] (j may be traced)."""
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, j, keepdims=False), stack)


def set_row(stack: PyTree, j: jax.Array, v: PyTree) -> PyTree:
    """The stack with row j replaced by v (cast to the stack's dtype): in place in a loop."""
    return jax.tree.map(
        lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y.astype(x.dtype), j, 0), stack, v)


def astype(tree: PyTree, dtype: Any) -> PyTree:
    """Every leaf cast to `dtype`."""
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def add(a: PyTree, b: PyTree) -> PyTree:
    """A + b."""
    return jax.tree.map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """A - b."""
    return jax.tree.map(jnp.subtract, a, b)


def scale(c: ArrayLike, a: PyTree) -> PyTree:
    """c·a for a scalar c (cast to each leaf's dtype)."""
    return jax.tree.map(lambda x: jnp.asarray(c, x.dtype) * x, a)


def axpy(c: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """c·x + y for a scalar c."""
    return jax.tree.map(lambda u, v: jnp.asarray(c, u.dtype) * u + v, x, y)


def where(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    """A where the scalar `pred` holds, else b."""
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def mul(a: PyTree, b: PyTree) -> PyTree:
    """The entrywise product a ⊙ b (broadcasting leading axes)."""
    return jax.tree.map(jnp.multiply, a, b)
