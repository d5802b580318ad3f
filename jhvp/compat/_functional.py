"""The six functions of `torch.autograd.functional`, on the native AD routes (`jhvp._ad`).

Each function validates its arguments in torch's order, then calls a jit-compiled, cached
implementation (the native API's cache, keyed on `func`). Checks that need the traced program
(output types, `strict=True` dependencies) run while it is traced, in torch's order, so they cost
nothing on repeated calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from .. import _ad, _cache, _filter
from . import _args, _strict
from . import _messages as msg

Inputs: TypeAlias = Any
"""An array (JAX, NumPy or a Python float) or a tuple of them, as torch takes Tensors."""

JacobianStrategy: TypeAlias = Literal["reverse-mode", "forward-mode"]


def _check_scalar_output(is_tuple: bool, outs: tuple, fn_name: str) -> None:
    if is_tuple:
        raise RuntimeError(f"The function given to {fn_name} should return a single Tensor")
    if np.size(outs[0]) != 1:
        raise RuntimeError(
            f"The Tensor returned by the function given to {fn_name} should contain a single "
            "element"
        )


def _hvp_like(get_f, fn_name: str, is_inputs_tuple: bool, create_graph: bool, strict: bool):
    forward_over_reverse = fn_name == "hvp"

    def impl(inputs: tuple, v: tuple | None):
        func = get_f()
        is_out_tuple, outs = _args.call_func(func, inputs, fn_name)
        out_deps = _strict.check_outputs_strict(func, inputs, len(outs)) if strict else None
        _check_scalar_output(is_out_tuple, outs, fn_name)
        if v is None:
            v = (jnp.ones_like(inputs[0]),)
        v = _args.cast_like(v, inputs)
        nums = tuple(range(len(inputs)))

        def loss(d: list):
            return jnp.reshape(func(*d), ()), None

        def product(xs, vs):
            if forward_over_reverse:
                value, _, hv, _ = _ad.value_grad_hvp(loss, list(xs), list(vs))
            else:
                value, hv, _ = _ad.rev_rev(loss, list(xs), list(vs))
            return value, hv

        if strict:
            assert out_deps is not None  # checked above under strict
            jac_deps = _strict.check_jacobian_strict(func, inputs, out_deps[0])
            if not forward_over_reverse:
                for i in nums:
                    if not any(i in d for d in jac_deps):
                        raise RuntimeError(msg.STRICT_JAC_INDEPENDENT.format(i=i))
            if create_graph:
                _strict.check_depends_on_inputs(lambda xs, vs: product(xs, vs)[1], inputs, v,
                                         msg.STRICT_CG_HESS)
        value, hv = product(inputs, v)
        value = jnp.reshape(value, jnp.shape(outs[0]))
        return _args.detach((value, _args.post(tuple(hv), is_inputs_tuple)), create_graph)

    return impl


def _jvp_impl(get_f, is_inputs_tuple: bool, create_graph: bool, strict: bool):
    def impl(inputs: tuple, v: tuple | None):
        func = get_f()
        is_out_tuple, outs = _args.call_func(func, inputs, "jvp")
        if v is None:
            v = (jnp.ones_like(inputs[0]),)
        v = _args.cast_like(v, inputs)

        def push(xs, vs):
            return jax.jvp(lambda *z: _args.call_func(func, z, "jvp")[1], xs, vs)[1]

        if strict:
            out_deps = _strict.check_outputs_strict(func, inputs, len(outs))
            _strict.check_first_order_strict(out_deps, push, inputs, v, create_graph)
        jv = push(inputs, v)
        result = (_args.post(outs, is_out_tuple), _args.post(tuple(jv), is_out_tuple))
        return _args.detach(result, create_graph)

    return impl


def _vjp_impl(get_f, is_inputs_tuple: bool, create_graph: bool, strict: bool):
    def impl(inputs: tuple, v: tuple | None):
        func = get_f()
        is_out_tuple, outs = _args.call_func(func, inputs, "vjp")
        out_deps = _strict.check_outputs_strict(func, inputs, len(outs)) if strict else None
        # torch checks v against the outputs, after func has run.
        if v is not None:
            _args.validate_v(v, [jnp.shape(o) for o in outs], is_out_tuple)
            v = _args.cast_like(v, outs)
        elif len(outs) != 1 or np.size(outs[0]) != 1:
            raise RuntimeError(msg.V_NONE_OUTPUT)
        else:
            v = (jnp.ones_like(outs[0]),)

        def pull(xs, vs):
            _, pullback = jax.vjp(lambda *z: _args.call_func(func, z, "vjp")[1], *xs)
            return pullback(vs)

        if strict:
            _strict.check_first_order_strict(out_deps, pull, inputs, v, create_graph)
        vj = pull(inputs, v)
        result = (_args.post(outs, is_out_tuple), _args.post(tuple(vj), is_inputs_tuple))
        return _args.detach(result, create_graph)

    return impl


def _vjp_outputs_only(func, inputs, strict):
    _, outs = _args.call_func(func, inputs, "vjp")
    if strict:
        _strict.check_outputs_strict(func, inputs, len(outs))


def _jacobian_impl(get_f, is_inputs_tuple, create_graph, strict, vectorize, strategy):
    def impl(inputs: tuple):
        func = get_f()
        nums = tuple(range(len(inputs)))
        if strategy == "forward-mode":
            # torch's _jacfwd calls `_args.as_tuple(..., "outputs")` with no function name.
            is_out_tuple, outs = _args.call_func(func, inputs, "None", "outputs")
            jac = jax.jacfwd(lambda *xs: _args.call_func(func, xs, "None", "outputs")[1],
                             argnums=nums)
        else:
            is_out_tuple, outs = _args.call_func(func, inputs, "jacobian")
            if strict:
                _strict.check_outputs_strict(func, inputs, len(outs))
                if vectorize:
                    raise RuntimeError(msg.JAC_STRICT_VECTORIZE)
                _strict.jacobian_checks(lambda *xs: _args.call_func(func, xs, "jacobian")[1],
                                        inputs, outs, create_graph)
            jac = jax.jacrev(lambda *xs: _args.call_func(func, xs, "jacobian")[1], argnums=nums)
        res = jac(*inputs)  # res[i][k]: output i, input k
        # torch's forward-mode path nests lists where its reverse-mode path nests tuples.
        seq = list if strategy == "forward-mode" else tuple
        res = seq(_args.post(seq(row), is_inputs_tuple) for row in res)
        return _args.detach(_args.post(res, is_out_tuple), create_graph)

    return impl


def _hessian_impl(get_f, is_inputs_tuple, create_graph, strict, vectorize, strategy):
    def impl(inputs: tuple):
        func = get_f()
        nums = tuple(range(len(inputs)))

        def single_output(*xs):
            out = func(*xs)
            is_tuple, outs = _args.as_tuple(out, msg.OUTPUTS, "hessian",
                                            accept=_args.is_output_array)
            if strict:
                _strict.check_outputs_strict(func, xs, len(outs))
            if is_tuple:
                raise RuntimeError("The function given to hessian should return a single Tensor")
            if np.size(outs[0]) != 1:
                raise RuntimeError(
                    "The Tensor returned by the function given to hessian should contain a "
                    "single element"
                )
            return jnp.reshape(jnp.asarray(outs[0]), ())

        grad = jax.grad(single_output, argnums=nums)
        if strict:
            out_deps = _strict.dependencies(single_output, *inputs)[0]
            jac_deps = _strict.dependencies(grad, *inputs)
            for i in nums:
                if i not in out_deps or not jac_deps[i]:
                    raise RuntimeError(msg.STRICT_JAC_CONST.format(i=i))
            if vectorize:
                raise RuntimeError(msg.JAC_STRICT_VECTORIZE)
            _strict.jacobian_checks(grad, inputs, inputs, create_graph)
        outer = jax.jacfwd if strategy == "forward-mode" else jax.jacrev
        res = outer(grad, argnums=nums)(*inputs)
        seq = list if strategy == "forward-mode" else tuple
        res = seq(_args.post(seq(row), is_inputs_tuple) for row in res)
        return _args.detach(_args.post(res, is_inputs_tuple), create_graph)

    return impl


_ENTRIES = _cache.table("compat")


def _compiled(func, fn_name: str, key: tuple, make: Callable) -> Callable:
    if not callable(func):
        raise TypeError(f"{fn_name}: `func` must be callable, got {type(func).__name__}.")

    def make_jitted(slot: _cache.Slot) -> Callable:
        # func is read from the running call while tracing, so the cache never holds it.
        return jax.jit(make(lambda: slot.leaves[0]))

    entry = _cache.lookup(_ENTRIES, (fn_name, key, _filter.static_key(func)),
                          lambda: _cache.Entry(make_jitted))
    return functools.partial(entry.call, [func], None)


def vjp(
    func: Callable[..., Any], inputs: Inputs, v: Inputs | None = None,
    create_graph: bool = False, strict: bool = False,
) -> tuple[Any, Any]:
    """Computes vᵀJ, the dot product of a vector v with the Jacobian of func at inputs.

    Mirrors `torch.autograd.functional.vjp`: same signature, return structure and errors.

    Args:
        func: A function taking arrays and returning an array or a tuple of arrays.
        inputs: An array (JAX, NumPy or a Python float) or a tuple of arrays.
        v: The vector, shaped like func's output; optional when func returns a single element.
        create_graph: If True, the results are differentiable (by `jax.grad`); else they are
            wrapped in `jax.lax.stop_gradient`, like torch's detached tensors.
        strict: If True, raise when an output does not depend on the inputs (decided from the
            traced program); else the result is zeros there.

    Returns:
        `(func_output, vjp)`, vjp shaped like the inputs (array in, array out; tuple in, tuple out).

    Raises:
        TypeError: inputs, v or func's outputs are not arrays or tuples of arrays.
        RuntimeError: v of the wrong length or size, or None where it cannot be; strict-mode
            failures, with torch's messages.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jhvp import compat
        >>> out, vj = compat.vjp(lambda x: 2 * x, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
        >>> print(out, vj)
        [2. 4.] [2. 2.]
    """
    is_inputs_tuple, inputs = _args.as_inputs(inputs, "vjp")
    fn = _compiled(func, "vjp", (is_inputs_tuple, bool(create_graph), bool(strict)),
                   lambda g: _vjp_impl(g, is_inputs_tuple, bool(create_graph), bool(strict)))
    if v is not None:
        try:
            _, v = _args.as_tuple(v, "v", "vjp")
        except TypeError:
            # torch checks v after calling func: func's own errors come first.
            jax.eval_shape(lambda xs: _vjp_outputs_only(func, xs, strict), inputs)
            raise
    return fn(inputs, v)


def jvp(
    func: Callable[..., Any], inputs: Inputs, v: Inputs | None = None,
    create_graph: bool = False, strict: bool = False,
) -> tuple[Any, Any]:
    """Computes J·v, the Jacobian of func at inputs times a vector v (forward mode).

    Mirrors `torch.autograd.functional.jvp`. torch computes it with the double-backward trick;
    JAX has a native forward mode, so this is one `jax.jvp` and costs about one evaluation of func.

    Args:
        func: A function taking arrays and returning an array or a tuple of arrays.
        inputs: An array or a tuple of arrays.
        v: The vector, shaped like the inputs; optional when the input is a single element.
        create_graph: If True, the results are differentiable; else detached.
        strict: If True, raise when an input or output is disconnected (traced program).

    Returns:
        `(func_output, jvp)`, jvp shaped like func's output.

    Raises:
        TypeError: As `vjp`.
        RuntimeError: As `vjp`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jhvp import compat
        >>> out, jv = compat.jvp(lambda x: x ** 2, jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0]))
        >>> print(out, jv)
        [1. 4.] [2. 0.]
    """
    is_inputs_tuple, inputs = _args.as_inputs(inputs, "jvp")
    v = _args.v_for_inputs(v, inputs, is_inputs_tuple, "jvp")
    fn = _compiled(func, "jvp", (is_inputs_tuple, bool(create_graph), bool(strict)),
                   lambda g: _jvp_impl(g, is_inputs_tuple, bool(create_graph), bool(strict)))
    return fn(inputs, v)


def _check_strategy(strategy, message):
    if strategy not in ("forward-mode", "reverse-mode"):
        raise AssertionError(message)


def _check_forward_mode(strategy, create_graph, strict, vectorize, inputs_check):
    if strategy != "forward-mode":
        return inputs_check()
    if create_graph:
        raise NotImplementedError(msg.JAC_FWD_CREATE_GRAPH)
    if strict:
        raise RuntimeError(msg.JAC_FWD_STRICT)
    checked = inputs_check()
    if not vectorize:
        raise NotImplementedError(msg.JAC_FWD_VECTORIZE)
    return checked


def jacobian(
    func: Callable[..., Any], inputs: Inputs, create_graph: bool = False, strict: bool = False,
    vectorize: bool = False, strategy: JacobianStrategy = "reverse-mode",
) -> Any:
    """Computes the Jacobian of func at inputs.

    Mirrors `torch.autograd.functional.jacobian`: `jac[i][k]` has shape
    `outputs[i].shape + inputs[k].shape`, nested as the output and input tuples are. In JAX
    every strategy is vectorized (`jax.jacrev` / `jax.jacfwd`); `vectorize` changes only which
    argument combinations are accepted, as in torch.

    Args:
        func: A function taking arrays and returning an array or a tuple of arrays.
        inputs: An array or a tuple of arrays.
        create_graph: If True, the result is differentiable; else detached.
        strict: If True, raise when an output is independent of an input (traced program).
        vectorize: Accepted for compatibility; required by torch for "forward-mode".
        strategy: "reverse-mode" (default) or "forward-mode".

    Returns:
        The Jacobian: an array, a tuple, or a tuple of tuples.

    Raises:
        AssertionError: unknown strategy (as torch; raised explicitly, not by `assert`).
        NotImplementedError: forward-mode with create_graph=True or vectorize=False.
        RuntimeError: strict with vectorize or forward-mode; strict-mode failures.
        TypeError: inputs or outputs are not arrays or tuples of arrays.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jhvp import compat
        >>> print(compat.jacobian(lambda x: x ** 2, jnp.array([1.0, 2.0])))
        [[2. 0.]
         [0. 4.]]
    """
    _check_strategy(strategy, msg.JAC_STRATEGY)
    is_inputs_tuple, inputs = _check_forward_mode(
        strategy, create_graph, strict, vectorize, lambda: _args.as_inputs(inputs, "jacobian"))
    flags = (is_inputs_tuple, bool(create_graph), bool(strict), bool(vectorize), strategy)
    fn = _compiled(func, "jacobian", flags, lambda g: _jacobian_impl(g, *flags))
    return fn(inputs)


def hessian(
    func: Callable[..., Any], inputs: Inputs, create_graph: bool = False, strict: bool = False,
    vectorize: bool = False, outer_jacobian_strategy: JacobianStrategy = "reverse-mode",
) -> Any:
    """Computes the Hessian of a scalar function func at inputs.

    Mirrors `torch.autograd.functional.hessian`: for a tuple of inputs, `H[i][j]` has shape
    `inputs[i].shape + inputs[j].shape`. Dense: n² memory; for products with vectors use
    `hvp` (or the native `jhvp.hvp`), which never forms H.

    Args:
        func: A function returning a single-element array.
        inputs: An array or a tuple of arrays.
        create_graph: If True, the result is differentiable; else detached.
        strict: If True, raise where torch would (traced program dependencies).
        vectorize: Accepted for compatibility; required by torch for the forward-mode outer
            Jacobian.
        outer_jacobian_strategy: "reverse-mode" (default) or "forward-mode".

    Returns:
        The Hessian: an array, or a tuple of tuples of arrays.

    Raises:
        AssertionError: unknown strategy.
        NotImplementedError: forward-mode with create_graph=True or vectorize=False.
        RuntimeError: func's output is a tuple or not a single element; strict-mode failures.
        TypeError: inputs or outputs are not arrays or tuples of arrays.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jhvp import compat
        >>> print(compat.hessian(lambda x: jnp.sum(x ** 3), jnp.array([1.0, 2.0])))
        [[ 6.  0.]
         [ 0. 12.]]
    """
    is_inputs_tuple, inputs = _args.as_inputs(inputs, "hessian")
    _check_strategy(outer_jacobian_strategy, msg.HESS_STRATEGY)
    _check_forward_mode(outer_jacobian_strategy, create_graph, strict, vectorize, lambda: None)
    flags = (is_inputs_tuple, bool(create_graph), bool(strict), bool(vectorize),
             outer_jacobian_strategy)
    fn = _compiled(func, "hessian", flags, lambda g: _hessian_impl(g, *flags))
    return fn(inputs)


def _hessian_product(fn_name, func, inputs, v, create_graph, strict):
    is_inputs_tuple, inputs = _args.as_inputs(inputs, fn_name)
    v = _args.v_for_inputs(v, inputs, is_inputs_tuple, fn_name)
    flags = (is_inputs_tuple, bool(create_graph), bool(strict))
    fn = _compiled(func, fn_name, flags, lambda g: _hvp_like(g, fn_name, *flags))
    return fn(inputs, v)


def vhp(
    func: Callable[..., Any], inputs: Inputs, v: Inputs | None = None,
    create_graph: bool = False, strict: bool = False,
) -> tuple[Any, Any]:
    """Computes vᵀH, v times the Hessian of a scalar func at inputs, reverse-over-reverse.

    Mirrors `torch.autograd.functional.vhp`. Unlike in torch, `hvp` is the faster route in JAX
    (forward-over-reverse); both return the same numbers for twice-differentiable func.

    Args:
        func: A function returning a single-element array.
        inputs: An array or a tuple of arrays.
        v: The vector, shaped like the inputs; optional when the input is a single element.
        create_graph: If True, the results are differentiable; else detached.
        strict: If True, raise where torch would (traced program dependencies).

    Returns:
        `(func_output, vhp)`, vhp shaped like the inputs.

    Raises:
        TypeError: As `vjp`.
        RuntimeError: As `hvp`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jhvp import compat
        >>> out, vh = compat.vhp(lambda x: jnp.sum(x ** 3), jnp.array([1.0, 2.0]),
        ...                      jnp.array([1.0, 1.0]))
        >>> print(out, vh)
        9.0 [ 6. 12.]
    """
    return _hessian_product("vhp", func, inputs, v, create_graph, strict)


def hvp(
    func: Callable[..., Any], inputs: Inputs, v: Inputs | None = None,
    create_graph: bool = False, strict: bool = False,
) -> tuple[Any, Any]:
    """Computes H·v, the Hessian of a scalar func at inputs times v, forward-over-reverse.

    Mirrors `torch.autograd.functional.hvp`, whose note says hvp is slower than vhp because of
    torch's double-backward trick. In JAX the opposite holds: this is one `jax.jvp` of
    `jax.grad`, the fast route (about two to three gradients of cost), compiled and cached.

    Args:
        func: A function returning a single-element array.
        inputs: An array or a tuple of arrays (JAX, NumPy, Python floats).
        v: The vector, shaped like the inputs; optional when the input is a single element.
        create_graph: If True, the results are differentiable; else detached.
        strict: If True, raise where torch would (traced program dependencies).

    Returns:
        `(func_output, hvp)`, hvp shaped like the inputs.

    Raises:
        TypeError: inputs, v or func's outputs are not arrays or tuples of arrays.
        RuntimeError: v of the wrong length or size, or None where it cannot be; func's output
            a tuple or not a single element; strict-mode failures.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jhvp import compat
        >>> out, hv = compat.hvp(lambda x: jnp.sum(x ** 3), jnp.array([1.0, 2.0]),
        ...                      jnp.array([1.0, 1.0]))
        >>> print(out, hv)
        9.0 [ 6. 12.]
    """
    return _hessian_product("hvp", func, inputs, v, create_graph, strict)
