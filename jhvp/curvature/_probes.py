"""Random probe vectors and their batching.

Probe i is always drawn from `jax.random.fold_in(key, i)`, so how probes are batched
(`batch_size`) never changes a result, only memory and speed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._typing import PyTree


def rademacher(key: jax.Array, i: Any, n: int, dtype: Any) -> jax.Array:
    """Returns probe i: n independent ±1 signs of `dtype`, drawn from `fold_in(key, i)`.

    One random 32-bit word gives 32 signs (unpacked with shifts), 32x fewer random bits than
    `jax.random.rademacher`, which was measured 11x slower for 99 probes of size 1e4.
    """
    words = -(-n // 32)
    bits = jax.random.bits(jax.random.fold_in(key, i), (words,), jnp.uint32)
    shifts = jnp.arange(32, dtype=jnp.uint32)
    unpacked = (bits[:, None] >> shifts[None, :]) & jnp.uint32(1)
    signs = unpacked.reshape(-1)[:n]
    return jnp.asarray(1, dtype) - jnp.asarray(2, dtype) * signs.astype(dtype)


def normal(key: jax.Array, i: Any, n: int, dtype: Any) -> jax.Array:
    """Returns probe i: n independent standard normal entries of `dtype`, from `fold_in(key, i)`."""
    return jax.random.normal(jax.random.fold_in(key, i), (n,), dtype)


def map_probes(
    fn: Callable[[jax.Array], PyTree], num: int, batch_size: int | None, *, start: int = 0
) -> PyTree:
    """Returns fn(i) for i in start, ..., start + num - 1, stacked along a leading axis of num.

    `batch_size=None` vmaps over all probes at once (the operator then sees matrix-matrix
    products); `batch_size=b` runs `jax.lax.map` over chunks of b, each chunk vmapped, bounding
    memory to b probes; a remainder of `num % b` probes runs as one last vmapped chunk.
    """
    if batch_size is None or batch_size >= num:
        return jax.vmap(fn)(jnp.arange(start, start + num, dtype=jnp.int32))
    chunks, rem = divmod(num, batch_size)
    idx = jnp.arange(start, start + chunks * batch_size, dtype=jnp.int32)
    main = jax.lax.map(jax.vmap(fn), idx.reshape(chunks, batch_size))
    main = jax.tree.map(lambda x: x.reshape((chunks * batch_size, *x.shape[2:])), main)
    if rem == 0:
        return main
    tail = jax.vmap(fn)(jnp.arange(start + chunks * batch_size, start + num, dtype=jnp.int32))
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), main, tail)


def check_batch_size(batch_size: Any, api: str) -> None:
    """Checks that `batch_size` is None or a positive int.

    Raises:
        TypeError: Not None and not an int.
        ValueError: An int below 1.
    """
    if batch_size is None:
        return
    if isinstance(batch_size, bool):
        raise TypeError(
            f"jhvp.curvature.{api}: `batch_size` must be None or a positive int, got "
            f"{batch_size!r}."
        )
    try:
        value = operator.index(batch_size)
    except TypeError:
        raise TypeError(
            f"jhvp.curvature.{api}: `batch_size` must be None or a positive int, got "
            f"{type(batch_size).__name__} ({batch_size!r})."
        ) from None
    if value < 1:
        raise ValueError(
            f"jhvp.curvature.{api}: `batch_size` must be a positive int (probes per chunk) or "
            f"None (all at once), got {value}."
        )
