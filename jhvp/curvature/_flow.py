"""The loops that apply the operator: `lax` loops, or Python loops of compiled steps.

Every algorithm of `jhvp.curvature` writes the loops whose bodies apply the operator through
this module, so one implementation serves both forms of operator. For an operator on the device
these are `jax.lax.while_loop`, `fori_loop`, `scan` and `map` inside the algorithm's one program.
For a `jhvp.StreamedOperator` (data on the host, read batch by batch) the algorithm runs
outside `jax.jit` and each loop runs in Python: its body, which applies the operator once, is
split at that application into two compiled halves, the part that computes the vector to apply
(traced with the operator recording its argument) and the part that consumes the product
(traced with the operator returning it), each traced once per call and compiled once per process
(programs are shared by equal traces), never per step or batch;
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


class _Compiled:
    """A function traced once (`jax.make_jaxpr`), run by a program shared by equal traces.

    The halves of a step are traced once per call and compiled once per process for equal
    jaxprs (a new call of an algorithm brings new closures, not a new program). The closed-over
    arrays (the jaxpr's constants) are arguments of the program, never baked in.
    """

    def __init__(self, fn: Callable, args: tuple):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        self.consts, self.out_tree = list(closed.consts), jax.tree.structure(out_shape)
        self.out_shape = out_shape
        key = (str(closed.jaxpr), self.out_tree)
        run = _PROGRAMS.get(key)
        if run is None:
            jaxpr = closed.jaxpr

            def evaluate(consts, leaves):
                return jax.core.eval_jaxpr(jaxpr, consts, *leaves)

            run = jax.jit(evaluate)
            if len(_PROGRAMS) >= _MAX_PROGRAMS:
                _PROGRAMS.pop(next(iter(_PROGRAMS)))
            _PROGRAMS[key] = run
        self.run = run

    def __call__(self, *args: Any) -> Any:
        return jax.tree.unflatten(self.out_tree, self.run(self.consts, jax.tree.leaves(args)))


_PROGRAMS: dict = {}  # str(jaxpr), output structure -> its jitted evaluator
_MAX_PROGRAMS = 256


class _Step:
    """A loop body over a streamed operator, split at its one application (or run eagerly)."""

    def __init__(self, stream: Any, body: Callable):
        self.stream, self.body = stream, body
        self.split: bool | None = None  # None: not yet tried
        self.halves: dict = {}  # batch size (None: unbatched) -> (pre, post) `_Compiled`

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

    def _halves(self, size: int | None, args: tuple) -> tuple | None:
        """The compiled halves for this batch size, traced on first use; None if unsplittable."""
        if self.split is False:
            return None
        if size not in self.halves:
            pre = self.pre if size is None else jax.vmap(self.pre)
            post = self.post if size is None else jax.vmap(self.post)
            try:
                first = _Compiled(pre, args)
                # A·v has v's shapes and the operator's dtypes.
                product = jax.tree.map(lambda v, g: jax.ShapeDtypeStruct(v.shape, g.dtype),
                                       first.out_shape, self.stream.grad)
                second = _Compiled(post, (product, *args))
            except Unsplittable:
                self.split = False
                return None
            self.split = True
            self.halves[size] = (first, second)
        return self.halves[size]

    def __call__(self, *args: Any) -> Any:
        halves = self._halves(None, args)
        if halves is None:
            return self.body(*args)
        pre, post = halves
        return post(self.stream(pre(*args)), *args)

    def batched(self, xs: jax.Array) -> Any:
        """The body vmapped over xs (a chunk of probe indices): one product of a stack."""
        halves = self._halves(int(xs.shape[0]), (xs,))
        if halves is None:
            return jax.vmap(self.body)(xs)
        pre, post = halves
        return post(jax.vmap(self.stream)(pre(xs)), xs)


def _trace_of(args: tuple) -> Any:
    leaves = jax.tree.leaves(args)
    return getattr(leaves[0], "_trace", None) if leaves else None


def _enter(op: Any) -> Any:
    stream = _stream(op)
    if stream is not None and Capture.stack():
        raise Unsplittable  # a loop inside a body being split: the body runs eagerly instead
    return stream


def while_loop(op: Any, cond: Callable, body: Callable, init: PyTree) -> PyTree:
    """`jax.lax.while_loop(cond, body, init)`; body applies `op` once."""
    stream = _enter(op)
    if stream is None:
        return jax.lax.while_loop(cond, body, init)
    step, state = _Step(stream, body), init
    test = _Compiled(cond, (init,))
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
