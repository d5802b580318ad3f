"""Which inputs can each output of a traced program depend on, differentiably.

The analogue of PyTorch's autograd-graph connectivity, used by `jhvp.compat`'s `strict=True`:
trace the function to a jaxpr and propagate, equation by equation, the set of inputs each value
is connected to. `stop_gradient` cuts the connection (torch's `.detach()`), and so do integer and
boolean values (they cannot carry derivatives). Call-like equations (`jit`, `checkpoint`,
`custom_jvp`/`custom_vjp` calls) are followed into their bodies; other structured primitives
(`scan`, `while`, `cond`) connect every input to every output, which can only make strict mode
more permissive, never raise where torch would not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp

_CUT = frozenset({"stop_gradient"})


def _differentiable(var) -> bool:
    dtype = getattr(var.aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _propagate(jaxpr, in_deps: Sequence[frozenset]) -> list[frozenset]:
    env: dict = {}

    def read(v) -> frozenset:
        if isinstance(v, jex.core.Literal):
            return frozenset()
        return env.get(v, frozenset())

    for var, deps in zip(jaxpr.invars, in_deps, strict=True):
        env[var] = deps if _differentiable(var) else frozenset()
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if eqn.primitive.name in _CUT:
            outs = [frozenset()] * len(eqn.outvars)
        else:
            outs = _through_subjaxpr(eqn, ins)
            if outs is None:
                union = frozenset().union(*ins)
                outs = [union] * len(eqn.outvars)
        for var, deps in zip(eqn.outvars, outs, strict=True):
            env[var] = deps if _differentiable(var) else frozenset()
    return [read(v) if _differentiable(v) else frozenset() for v in jaxpr.outvars]


def _through_subjaxpr(eqn, ins):
    # Follow a call-like equation whose single body maps its inputs and outputs one to one.
    bodies = list(jex.core.jaxprs_in_params(eqn.params))
    if len(bodies) != 1:
        return None
    body = bodies[0]
    body = getattr(body, "jaxpr", body)  # ClosedJaxpr -> Jaxpr
    if len(body.invars) != len(ins) or len(body.outvars) != len(eqn.outvars):
        return None
    return _propagate(body, ins)


def input_dependencies(fun: Callable, args: tuple) -> list[frozenset]:
    """Returns, for each flat output of `fun(*args)`, the set of positional args it depends on.

    Traces `fun` with the shapes and dtypes of `args` (each arg a pytree); nothing is computed.
    """
    closed = jax.make_jaxpr(fun)(*args)
    in_deps = []
    for i, arg in enumerate(args):
        in_deps += [frozenset({i})] * len(jax.tree.leaves(arg))
    return _propagate(closed.jaxpr, in_deps)
