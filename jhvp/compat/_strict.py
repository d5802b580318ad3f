"""strict=True: which inputs each output of a traced program depends on, differentiably.

The analogue of PyTorch's autograd-graph connectivity: trace the function to a jaxpr and
propagate, equation by equation, the set of inputs each value is connected to. `stop_gradient`
cuts the connection (torch's `.detach()`), and so do integer and boolean values (they cannot carry
derivatives). Call-like equations (`jit`, `checkpoint`, `custom_jvp`/`custom_vjp` calls) are
followed into their bodies; a `scan` body is iterated to a fixed point over its carry, so a chain
a -> b -> c through the loop is seen; other structured primitives (`while`, `cond`) connect every
input to every output, which can only make strict mode more permissive, never raise where torch
would not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from . import _args
from . import _messages as msg

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
        outs: list[frozenset]
        if eqn.primitive.name in _CUT:
            outs = [frozenset()] * len(eqn.outvars)
        else:
            through = _through_subjaxpr(eqn, ins)
            outs = [frozenset().union(*ins)] * len(eqn.outvars) if through is None else through
        for var, deps in zip(eqn.outvars, outs, strict=True):
            env[var] = deps if _differentiable(var) else frozenset()
    return [read(v) if _differentiable(v) else frozenset() for v in jaxpr.outvars]


# Equations that call one body on their own inputs: followed into it, outputs one to one.
_CALLS = frozenset({
    "jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint", "custom_jvp_call",
    "custom_vjp_call", "custom_vjp_call_jaxpr",
})


def _through_subjaxpr(eqn, ins):
    if eqn.primitive.name == "scan":
        return _through_scan(eqn, ins)
    if eqn.primitive.name not in _CALLS:
        return None
    bodies = list(jex.core.jaxprs_in_params(eqn.params))
    if len(bodies) != 1:
        return None
    body = bodies[0]
    body = getattr(body, "jaxpr", body)  # ClosedJaxpr -> Jaxpr
    if len(body.invars) != len(ins) or len(body.outvars) != len(eqn.outvars):
        return None
    return _propagate(body, ins)


def _through_scan(eqn, ins):
    # One pass over the body sees one iteration; a chain a -> b -> c through the carry needs
    # several. Iterate to a fixed point: each carry's set only grows, so this ends within
    # len(carry) + 1 passes.
    body = eqn.params["jaxpr"]
    body = getattr(body, "jaxpr", body)
    n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    consts, rest = ins[:n_consts], ins[n_consts:]
    carry, xs = list(rest[:n_carry]), rest[n_carry:]
    while True:
        outs = _propagate(body, [*consts, *carry, *xs])
        grown = [c | o for c, o in zip(carry, outs[:n_carry], strict=True)]
        if grown == carry:
            return [*carry, *outs[n_carry:]]
        carry = grown


def _scalar_loss(func):
    def loss(*xs):
        return jnp.reshape(func(*xs), ())

    return loss


def input_dependencies(fun: Callable, args: tuple) -> list[frozenset]:
    """Returns, for each flat output of `fun(*args)`, the set of positional args it depends on.

    Traces `fun` with the shapes and dtypes of `args` (each arg a pytree); nothing is computed.
    """
    closed = jax.make_jaxpr(fun)(*args)
    in_deps = []
    for i, arg in enumerate(args):
        in_deps += [frozenset({i})] * len(jax.tree.leaves(arg))
    return _propagate(closed.jaxpr, in_deps)


def avals(xs):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), xs)


def dependencies(fun: Callable, *args) -> list[frozenset]:
    return input_dependencies(fun, avals(args))


def check_outputs_strict(func, inputs, n_out) -> list[frozenset]:
    """Torch's `_check_requires_grad(outputs, "outputs")`; returns each output's input set."""
    deps = dependencies(lambda *xs: _args.call_func(func, xs, "")[1], *inputs)
    for i in range(n_out):
        if not deps[i]:
            raise RuntimeError(msg.STRICT_OUT.format(i=i))
    return deps


def check_jacobian_strict(func, inputs, out_deps) -> list[frozenset]:
    """hvp/vhp: the gradient must exist for every input and depend on the inputs."""
    loss = _scalar_loss(func)
    jac_deps = dependencies(lambda *xs: jax.grad(loss, argnums=tuple(range(len(xs))))(*xs), *inputs)
    for i in range(len(inputs)):
        if i not in out_deps:
            raise RuntimeError(msg.STRICT_INDEPENDENT.format(i=i))
        if not jac_deps[i]:
            raise RuntimeError(msg.STRICT_JAC_CONST.format(i=i))
    return jac_deps


def check_depends_on_inputs(fun, inputs, vs, message) -> None:
    """create_graph+strict: each result must depend on the inputs (not only on v)."""
    deps = dependencies(lambda xs, v: fun(xs, v), inputs, vs)
    for i, d in enumerate(deps):
        if 0 not in d:
            raise RuntimeError(message.format(i=i))


def check_first_order_strict(out_deps, product, inputs, v, create_graph) -> None:
    """jvp/vjp: every input must reach some output; with create_graph, J must vary with it."""
    connected = frozenset().union(*out_deps)
    for i in range(len(inputs)):
        if i not in connected:
            raise RuntimeError(msg.STRICT_INDEPENDENT.format(i=i))
    if create_graph:
        check_depends_on_inputs(product, inputs, v, msg.STRICT_CG_JAC)


def jacobian_checks(func, inputs, outs, create_graph, name_fn: Callable[[int], str] | None = None):
    """Torch's non-vectorized reverse-mode loop: (output i, input k) pairs in order."""
    out_deps = dependencies(lambda *xs: func(*xs), *inputs)
    jac_deps: list[frozenset] = []  # read only with create_graph
    if create_graph:
        jac = jax.jacrev(lambda *xs: func(*xs), argnums=tuple(range(len(inputs))))
        jac_deps = dependencies(lambda *xs: jac(*xs), *inputs)
    for i, out in enumerate(outs):
        if np.size(out) == 0:
            continue
        for k in range(len(inputs)):
            if k not in out_deps[i]:
                raise RuntimeError(msg.STRICT_JACOBIAN_PAIR.format(i=i, k=k))
            if create_graph and not jac_deps[i * len(inputs) + k]:
                raise RuntimeError(msg.STRICT_CG_JAC.format(i=i))
