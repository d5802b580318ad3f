"""The loops that apply the operator: `lax` loops, or Python loops of compiled steps.

Every algorithm of `jhvp.curvature` writes the loops whose bodies apply the operator through
this module, so one implementation serves both forms of operator. For an operator on the device
these are `jax.lax.while_loop`, `fori_loop`, `scan` and `map` inside the algorithm's one program.
For a `jhvp.StreamedOperator` (data on the host, read batch by batch) the algorithm runs
outside `jax.jit` and each loop runs in Python: its body, which applies the operator once, is
split at that application into two compiled halves, the part that computes the vector to apply
(traced with the operator recording its argument) and the part that consumes the product
(traced with the operator returning it), each compiled once per call, not per step or batch;
between them the operator's own Python loop over the batches applies it. A body that applies it
other than exactly once at its top level (inside a `jax.vmap` of its own, or in a nested loop)
runs eagerly instead, its nested loops again through here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._data import Capture, Unsplittable
from .._typing import PyTree

traces = [0]
"""How many step halves have been traced (a test's count: constant in steps and batches)."""


def _stream(op: Any) -> Any:
    return getattr(op, "streamed", None)


class _Step:
    """A loop body over a streamed operator, split at its one application (or run eagerly)."""

    def __init__(self, stream: Any, body: Callable):
        self.stream, self.body = stream, body
        self.split: bool | None = None  # None: not yet tried
        self._batched: dict = {}

        def pre(*args):
            traces[0] += 1
            owner = _trace_of(args)
            with Capture("record", owner=owner) as capture:
                body(*args)
            if len(capture.vectors) != 1:
                raise Unsplittable
            return capture.vectors[0]

        def post(product, *args):
            traces[0] += 1
            with Capture("replay", product):
                return body(*args)

        self.pre, self.post = pre, post
        self.jit_pre, self.jit_post = jax.jit(pre), jax.jit(post)

    def __call__(self, *args: Any) -> Any:
        if self.split is not False:
            try:
                vector = self.jit_pre(*args)
                self.split = True
            except Unsplittable:
                self.split = False
            else:
                return self.jit_post(self.stream(vector), *args)
        return self.body(*args)

    def batched(self, xs: jax.Array) -> Any:
        """The body vmapped over xs (a chunk of probe indices): one product of a stack."""
        if self.split is not False:
            size = int(xs.shape[0])
            if size not in self._batched:
                self._batched[size] = (jax.jit(jax.vmap(self.pre)),
                                       jax.jit(jax.vmap(self.post)))
            pre, post = self._batched[size]
            try:
                vectors = pre(xs)
                self.split = True
            except Unsplittable:
                self.split = False
            else:
                return post(jax.vmap(self.stream)(vectors), xs)
        return jax.vmap(self.body)(xs)


def _trace_of(args: tuple) -> Any:
    leaves = jax.tree.leaves(args)
    return getattr(leaves[0], "_trace", None) if leaves else None


def _enter(op: Any) -> Any:
    stream = _stream(op)
    if stream is not None and Capture.active:
        raise Unsplittable  # a loop inside a body being split: the body runs eagerly instead
    return stream


def while_loop(op: Any, cond: Callable, body: Callable, init: PyTree) -> PyTree:
    """`jax.lax.while_loop(cond, body, init)`; body applies `op` once."""
    stream = _enter(op)
    if stream is None:
        return jax.lax.while_loop(cond, body, init)
    step, test, state = _Step(stream, body), jax.jit(cond), init
    while bool(test(state)):
        state = step(state)
    return state


def fori_loop(op: Any, lower: int, upper: int, body: Callable, init: PyTree) -> PyTree:
    """`jax.lax.fori_loop(lower, upper, body, init)` (static bounds); body applies `op` once."""
    stream = _enter(op)
    if stream is None:
        return jax.lax.fori_loop(lower, upper, body, init)
    step, state = _Step(stream, body), init
    for i in range(lower, upper):
        state = step(jnp.asarray(i, jnp.int32), state)
    return state


def scan(op: Any, f: Callable, init: PyTree, xs: jax.Array) -> tuple[PyTree, PyTree]:
    """`jax.lax.scan(f, init, xs)` over an array xs; f applies `op` once."""
    stream = _enter(op)
    if stream is None:
        return jax.lax.scan(f, init, xs)
    step, carry, ys = _Step(stream, f), init, []
    for i in range(int(xs.shape[0])):
        carry, y = step(carry, xs[i])
        ys.append(y)
    stacked = None if not ys or ys[0] is None else jax.tree.map(lambda *y: jnp.stack(y), *ys)
    return carry, stacked


def map_chunks(op: Any, fn: Callable, first: int, num: int, size: int) -> PyTree | None:
    """fn(i) for i in first..first+num-1, `size` at a time (vmapped), stacked; None on device.

    For a streamed operator only (on the device, `_sketch.map_probes` builds the program).
    """
    stream = _enter(op)
    if stream is None:
        return None
    step, outs = _Step(stream, fn), []
    for lo in range(first, first + num, size):
        outs.append(step.batched(jnp.arange(lo, min(lo + size, first + num), dtype=jnp.int32)))
    return jax.tree.map(lambda *x: jnp.concatenate(x), *outs)
