"""The `torch.autograd.functional` mirror: signatures, return structures, errors, strict mode.

Each function validates its arguments in torch's order, then calls a jit-compiled, cached
implementation (keyed on `func` like the native API). Checks that need the traced program
(output types, `strict=True` dependencies) run while it is traced, in torch's order, so they
cost nothing on repeated calls. Message texts are copied from torch/autograd/functional.py
(PyTorch 2.x), including its quirks ("isonly", "input {i}" naming an output index).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _jit
from ._deps import input_dependencies

# ---- messages (torch's wording) ----

_STRICT_OUT = (
    "Output {i} of the user-provided function does not require gradients."
    " The outputs must be computed in a differentiable manner from the input"
    " when running in strict mode."
)
_STRICT_INDEPENDENT = (
    "The output of the user-provided function is independent of input {i}."
    " This is not allowed in strict mode."
)
_STRICT_JAC_CONST = (
    "While computing the hessian, found that the jacobian of the user-provided"
    " function with respect to input {i} is independent of the input. This is not"
    " allowed in strict mode. You should ensure that your function is twice"
    " differentiable and that the jacobian depends on the inputs (this would be"
    " violated by a linear function for example)."
)
_STRICT_JAC_INDEPENDENT = (
    "The jacobian of the user-provided function is independent of input {i}."
    " This is not allowed in strict mode."
)
_STRICT_CG_JAC = (
    "The jacobian of the user-provided function is independent of input {i}."
    " This is not allowed in strict mode when create_graph=True."
)
_STRICT_CG_HESS = (
    "The hessian of the user-provided function is independent of input {i}."
    " This is not allowed in strict mode when create_graph=True."
)
_STRICT_JACOBIAN_PAIR = (
    "Output {i} of the user-provided function is independent of input {k}."
    " This is not allowed in strict mode."
)
_JAC_STRICT_VECTORIZE = (
    "torch.autograd.functional.jacobian: `strict=True` and `vectorized=True` are not supported"
    " together. Please either set `strict=False` or `vectorize=False`."
)
_JAC_FWD_STRICT = (
    "torch.autograd.functional.jacobian: `strict=True` and `strategy=\"forward-mode\"` are not"
    " supported together (yet). Please either set `strict=False` or"
    " `strategy=\"reverse-mode\"`."
)
_JAC_FWD_CREATE_GRAPH = (
    "torch.autograd.functional.jacobian: `create_graph=True` and `strategy=\"forward-mode\"` are"
    " not supported together (yet). Please either set `create_graph=False` or"
    " `strategy=\"reverse-mode\"`."
)
_JAC_FWD_VECTORIZE = (
    "Computing Jacobian using forward-AD or forward-over-reverse Hessian is"
    "only implemented for `vectorize=True`."
)
_JAC_STRATEGY = (
    'Expected strategy to be either "forward-mode" or "reverse-mode". Hint: If your '
    'function has more outputs than inputs, "forward-mode" tends to be more performant. '
    'Otherwise, prefer to use "reverse-mode".'
)
_HESS_STRATEGY = 'Expected strategy to be either "forward-mode" or "reverse-mode".'
_V_NONE_INPUT = (
    "The vector v can only be None if the input to the user-provided function is a single"
    " Tensor with a single element."
)
_V_NONE_OUTPUT = (
    "The vector v can only be None if the user-provided function returns a single Tensor"
    " with a single element."
)
_OUTPUTS = "outputs of the user-provided function"


def _size(shape: tuple) -> str:
    return f"torch.Size({list(shape)})"


# ---- argument handling ----


# Arrays, and Python floats where torch would want a 0-d tensor (ints stay rejected, as in torch,
# so `(x, 2)` is still the error torch's tests expect). Plain tuples: isinstance is faster on them.
_INPUT_TYPES = (jax.Array, np.ndarray, np.generic, float)
_OUTPUT_TYPES = (jax.Array, np.ndarray, np.generic)
_FLOATING: dict = {}  # dtype -> is it floating; jnp.issubdtype costs ~1 µs a call


def _is_array(x: Any) -> bool:
    return isinstance(x, _INPUT_TYPES)


def _is_output_array(x: Any) -> bool:
    return isinstance(x, _OUTPUT_TYPES)


def _is_floating(dtype) -> bool:
    known = _FLOATING.get(dtype)
    if known is None:
        known = _FLOATING[dtype] = bool(jnp.issubdtype(dtype, jnp.floating))
    return known


def _as_tuple(inp: Any, arg_name: str, fn_name: str, accept=_is_array) -> tuple[bool, tuple]:
    """Torch's `_as_tuple`: (was it a tuple, the tuple), TypeError on a non-array element."""
    is_tuple = isinstance(inp, tuple)
    items = inp if is_tuple else (inp,)
    for i, el in enumerate(items):
        if not accept(el):
            if is_tuple:
                raise TypeError(
                    f"The {arg_name} given to {fn_name} must be either a Tensor or a tuple of "
                    f"Tensors but the value at index {i} has type {type(el)}."
                )
            raise TypeError(
                f"The {arg_name} given to {fn_name} must be either a Tensor or a tuple of Tensors "
                f"but the given {arg_name} has type {type(el)}."
            )
    return is_tuple, items


def _as_inputs(inputs: Any, fn_name: str) -> tuple[bool, tuple]:
    is_tuple, items = _as_tuple(inputs, "inputs", fn_name)
    arrays = []
    for x in items:
        if isinstance(x, float):
            x = jnp.asarray(x)
        if not _is_floating(x.dtype):
            # torch: inputs are made to require grad, which only floating dtypes can.
            raise RuntimeError("only Tensors of floating point dtype can require gradients")
        arrays.append(x)
    return is_tuple, tuple(arrays)


def _shape(x) -> tuple:
    shape = getattr(x, "shape", None)
    return np.shape(x) if shape is None else tuple(shape)


def _validate_v(v: tuple, other_shapes: list[tuple], is_other_tuple: bool) -> None:
    if len(other_shapes) != len(v):
        if is_other_tuple:
            raise RuntimeError(
                f"v is a tuple of invalid length: should be {len(other_shapes)} but got {len(v)}."
            )
        raise RuntimeError("The given v should contain a single Tensor.")
    for idx, (el_v, shape) in enumerate(zip(v, other_shapes, strict=True)):
        if _shape(el_v) != tuple(shape):
            prepend = f"Entry {idx} in " if is_other_tuple else ""
            raise RuntimeError(
                f"{prepend}v has invalid size: should be {_size(shape)} but got "
                f"{_size(np.shape(el_v))}."
            )


def _v_for_inputs(v, inputs: tuple, is_inputs_tuple: bool, fn_name: str):
    """hvp/vhp/jvp: v is checked against the inputs before func is called."""
    if v is None:
        if len(inputs) != 1 or np.size(inputs[0]) != 1:
            raise RuntimeError(_V_NONE_INPUT)
        return None
    _, v = _as_tuple(v, "v", fn_name)
    _validate_v(v, [_shape(x) for x in inputs], is_inputs_tuple)
    return v


# ---- trace-time helpers ----


def _call(func: Callable, inputs: tuple, fn_name: str, arg_name: str = _OUTPUTS):
    out = func(*inputs)
    is_tuple, outs = _as_tuple(out, arg_name, fn_name, accept=_is_output_array)
    return is_tuple, tuple(jnp.asarray(o) for o in outs)


def _avals(xs):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), xs)


def _deps(fun: Callable, *args) -> list[frozenset]:
    return input_dependencies(fun, _avals(args))


def _check_outputs_strict(func, inputs, n_out) -> list[frozenset]:
    """Torch's `_check_requires_grad(outputs, "outputs")`; returns each output's input set."""
    deps = _deps(lambda *xs: _call(func, xs, "")[1], *inputs)
    for i in range(n_out):
        if not deps[i]:
            raise RuntimeError(_STRICT_OUT.format(i=i))
    return deps


def _detach(tree, create_graph: bool):
    return tree if create_graph else jax.lax.stop_gradient(tree)


def _scalar_loss(func):
    def loss(*xs):
        return jnp.reshape(func(*xs), ())

    return loss


def _check_scalar_output(is_tuple: bool, outs: tuple, fn_name: str) -> None:
    if is_tuple:
        raise RuntimeError(f"The function given to {fn_name} should return a single Tensor")
    if np.size(outs[0]) != 1:
        raise RuntimeError(
            f"The Tensor returned by the function given to {fn_name} should contain a single "
            "element"
        )


def _check_jacobian_strict(func, inputs, out_deps) -> list[frozenset]:
    """hvp/vhp: the gradient must exist for every input and depend on the inputs."""
    loss = _scalar_loss(func)
    jac_deps = _deps(lambda *xs: jax.grad(loss, argnums=tuple(range(len(xs))))(*xs), *inputs)
    for i in range(len(inputs)):
        if i not in out_deps:
            raise RuntimeError(_STRICT_INDEPENDENT.format(i=i))
        if not jac_deps[i]:
            raise RuntimeError(_STRICT_JAC_CONST.format(i=i))
    return jac_deps


def _check_depends_on_inputs(fun, inputs, vs, message) -> None:
    """create_graph+strict: each result must depend on the inputs (not only on v)."""
    deps = _deps(lambda xs, v: fun(xs, v), inputs, vs)
    for i, d in enumerate(deps):
        if 0 not in d:
            raise RuntimeError(message.format(i=i))


def _check_first_order_strict(out_deps, product, inputs, v, create_graph) -> None:
    """jvp/vjp: every input must reach some output; with create_graph, J must vary with it."""
    connected = frozenset().union(*out_deps)
    for i in range(len(inputs)):
        if i not in connected:
            raise RuntimeError(_STRICT_INDEPENDENT.format(i=i))
    if create_graph:
        _check_depends_on_inputs(product, inputs, v, _STRICT_CG_JAC)


def _cast_like(v: tuple, refs: tuple) -> tuple:
    return tuple(jnp.asarray(t, jnp.result_type(r)) for t, r in zip(v, refs, strict=True))


def _post(res: tuple, is_tuple: bool):
    return res if is_tuple else res[0]


# ---- the compiled implementations ----


def _hvp_like(get_f, fn_name: str, is_inputs_tuple: bool, create_graph: bool, strict: bool):
    forward_over_reverse = fn_name == "hvp"

    def impl(inputs: tuple, v: tuple | None):
        func = get_f()
        is_out_tuple, outs = _call(func, inputs, fn_name)
        out_deps = _check_outputs_strict(func, inputs, len(outs)) if strict else None
        _check_scalar_output(is_out_tuple, outs, fn_name)
        if v is None:
            v = (jnp.ones_like(inputs[0]),)
        v = _cast_like(v, inputs)
        loss = _scalar_loss(func)
        nums = tuple(range(len(inputs)))

        def product(xs, vs):
            if forward_over_reverse:
                (value, _), (_, hv) = jax.jvp(
                    lambda *z: jax.value_and_grad(loss, argnums=nums)(*z), xs, vs
                )
                return value, hv
            def grad_and_value(*z):
                value, grad = jax.value_and_grad(loss, argnums=nums)(*z)
                return grad, value

            _, pullback, value = jax.vjp(grad_and_value, *xs, has_aux=True)
            return value, pullback(vs)

        if strict:
            jac_deps = _check_jacobian_strict(func, inputs, out_deps[0])
            if not forward_over_reverse:
                for i in nums:
                    if not any(i in d for d in jac_deps):
                        raise RuntimeError(_STRICT_JAC_INDEPENDENT.format(i=i))
            if create_graph:
                _check_depends_on_inputs(lambda xs, vs: product(xs, vs)[1], inputs, v,
                                         _STRICT_CG_HESS)
        value, hv = product(inputs, v)
        value = jnp.reshape(value, jnp.shape(outs[0]))
        return _detach((value, _post(tuple(hv), is_inputs_tuple)), create_graph)

    return impl


def _jvp_impl(get_f, is_inputs_tuple: bool, create_graph: bool, strict: bool):
    def impl(inputs: tuple, v: tuple | None):
        func = get_f()
        is_out_tuple, outs = _call(func, inputs, "jvp")
        if v is None:
            v = (jnp.ones_like(inputs[0]),)
        v = _cast_like(v, inputs)

        def push(xs, vs):
            return jax.jvp(lambda *z: _call(func, z, "jvp")[1], xs, vs)[1]

        if strict:
            out_deps = _check_outputs_strict(func, inputs, len(outs))
            _check_first_order_strict(out_deps, push, inputs, v, create_graph)
        jv = push(inputs, v)
        return _detach((_post(outs, is_out_tuple), _post(tuple(jv), is_out_tuple)), create_graph)

    return impl


def _vjp_impl(get_f, is_inputs_tuple: bool, create_graph: bool, strict: bool):
    def impl(inputs: tuple, v: tuple | None):
        func = get_f()
        is_out_tuple, outs = _call(func, inputs, "vjp")
        out_deps = _check_outputs_strict(func, inputs, len(outs)) if strict else None
        # torch checks v against the outputs, after func has run.
        if v is not None:
            _validate_v(v, [jnp.shape(o) for o in outs], is_out_tuple)
            v = _cast_like(v, outs)
        elif len(outs) != 1 or np.size(outs[0]) != 1:
            raise RuntimeError(_V_NONE_OUTPUT)
        else:
            v = (jnp.ones_like(outs[0]),)

        def pull(xs, vs):
            _, pullback = jax.vjp(lambda *z: _call(func, z, "vjp")[1], *xs)
            return pullback(vs)

        if strict:
            _check_first_order_strict(out_deps, pull, inputs, v, create_graph)
        vj = pull(inputs, v)
        return _detach((_post(outs, is_out_tuple), _post(tuple(vj), is_inputs_tuple)), create_graph)

    return impl


def _vjp_outputs_only(func, inputs, strict):
    _, outs = _call(func, inputs, "vjp")
    if strict:
        _check_outputs_strict(func, inputs, len(outs))


def _jacobian_checks(func, inputs, outs, create_graph, name_fn: Callable[[int], str] | None = None):
    """Torch's non-vectorized reverse-mode loop: (output i, input k) pairs in order."""
    out_deps = _deps(lambda *xs: func(*xs), *inputs)
    jac_deps = None
    if create_graph:
        jac = jax.jacrev(lambda *xs: func(*xs), argnums=tuple(range(len(inputs))))
        jac_deps = _deps(lambda *xs: jac(*xs), *inputs)
    for i, out in enumerate(outs):
        if np.size(out) == 0:
            continue
        for k in range(len(inputs)):
            if k not in out_deps[i]:
                raise RuntimeError(_STRICT_JACOBIAN_PAIR.format(i=i, k=k))
            if create_graph and not jac_deps[i * len(inputs) + k]:
                raise RuntimeError(_STRICT_CG_JAC.format(i=i))


def _jacobian_impl(get_f, is_inputs_tuple, create_graph, strict, vectorize, strategy):
    def impl(inputs: tuple):
        func = get_f()
        nums = tuple(range(len(inputs)))
        if strategy == "forward-mode":
            # torch's _jacfwd calls `_as_tuple(..., "outputs")` with no function name.
            is_out_tuple, outs = _call(func, inputs, "None", "outputs")
            jac = jax.jacfwd(lambda *xs: _call(func, xs, "None", "outputs")[1], argnums=nums)
        else:
            is_out_tuple, outs = _call(func, inputs, "jacobian")
            if strict:
                _check_outputs_strict(func, inputs, len(outs))
                if vectorize:
                    raise RuntimeError(_JAC_STRICT_VECTORIZE)
                _jacobian_checks(lambda *xs: _call(func, xs, "jacobian")[1], inputs, outs,
                                 create_graph)
            jac = jax.jacrev(lambda *xs: _call(func, xs, "jacobian")[1], argnums=nums)
        res = jac(*inputs)  # res[i][k]: output i, input k
        # torch's forward-mode path nests lists where its reverse-mode path nests tuples.
        seq = list if strategy == "forward-mode" else tuple
        res = seq(_post(seq(row), is_inputs_tuple) for row in res)
        return _detach(_post(res, is_out_tuple), create_graph)

    return impl


def _hessian_impl(get_f, is_inputs_tuple, create_graph, strict, vectorize, strategy):
    def impl(inputs: tuple):
        func = get_f()
        nums = tuple(range(len(inputs)))

        def single_output(*xs):
            out = func(*xs)
            is_tuple, outs = _as_tuple(out, _OUTPUTS, "hessian", accept=_is_output_array)
            if strict:
                _check_outputs_strict(func, xs, len(outs))
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
            out_deps = _deps(single_output, *inputs)[0]
            jac_deps = _deps(grad, *inputs)
            for i in nums:
                if i not in out_deps or not jac_deps[i]:
                    raise RuntimeError(_STRICT_JAC_CONST.format(i=i))
            if vectorize:
                raise RuntimeError(_JAC_STRICT_VECTORIZE)
            _jacobian_checks(grad, inputs, inputs, create_graph)
        outer = jax.jacfwd if strategy == "forward-mode" else jax.jacrev
        res = outer(grad, argnums=nums)(*inputs)
        seq = list if strategy == "forward-mode" else tuple
        res = seq(_post(seq(row), is_inputs_tuple) for row in res)
        return _detach(_post(res, is_inputs_tuple), create_graph)

    return impl


def _compiled(func, fn_name: str, key: tuple, make: Callable):
    if not callable(func):
        raise TypeError(f"{fn_name}: `func` must be callable, got {type(func).__name__}.")
    return _jit.cached(func, ("compat", fn_name, *key), lambda get_f: jax.jit(make(get_f)))


# ---- public functions ----


def vjp(func, inputs, v=None, create_graph=False, strict=False):
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
    is_inputs_tuple, inputs = _as_inputs(inputs, "vjp")
    fn = _compiled(func, "vjp", (is_inputs_tuple, bool(create_graph), bool(strict)),
                   lambda g: _vjp_impl(g, is_inputs_tuple, bool(create_graph), bool(strict)))
    if v is not None:
        try:
            _, v = _as_tuple(v, "v", "vjp")
        except TypeError:
            # torch checks v after calling func: func's own errors come first.
            jax.eval_shape(lambda xs: _vjp_outputs_only(func, xs, strict), inputs)
            raise
    return fn(inputs, v)


def jvp(func, inputs, v=None, create_graph=False, strict=False):
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
    is_inputs_tuple, inputs = _as_inputs(inputs, "jvp")
    v = _v_for_inputs(v, inputs, is_inputs_tuple, "jvp")
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
        raise NotImplementedError(_JAC_FWD_CREATE_GRAPH)
    if strict:
        raise RuntimeError(_JAC_FWD_STRICT)
    checked = inputs_check()
    if not vectorize:
        raise NotImplementedError(_JAC_FWD_VECTORIZE)
    return checked


def jacobian(func, inputs, create_graph=False, strict=False, vectorize=False,
             strategy="reverse-mode"):
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
    _check_strategy(strategy, _JAC_STRATEGY)
    is_inputs_tuple, inputs = _check_forward_mode(
        strategy, create_graph, strict, vectorize, lambda: _as_inputs(inputs, "jacobian"))
    flags = (is_inputs_tuple, bool(create_graph), bool(strict), bool(vectorize), strategy)
    fn = _compiled(func, "jacobian", flags, lambda g: _jacobian_impl(g, *flags))
    return fn(inputs)


def hessian(func, inputs, create_graph=False, strict=False, vectorize=False,
            outer_jacobian_strategy="reverse-mode"):
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
    is_inputs_tuple, inputs = _as_inputs(inputs, "hessian")
    _check_strategy(outer_jacobian_strategy, _HESS_STRATEGY)
    _check_forward_mode(outer_jacobian_strategy, create_graph, strict, vectorize, lambda: None)
    flags = (is_inputs_tuple, bool(create_graph), bool(strict), bool(vectorize),
             outer_jacobian_strategy)
    fn = _compiled(func, "hessian", flags, lambda g: _hessian_impl(g, *flags))
    return fn(inputs)


def _hessian_product(fn_name, func, inputs, v, create_graph, strict):
    is_inputs_tuple, inputs = _as_inputs(inputs, fn_name)
    v = _v_for_inputs(v, inputs, is_inputs_tuple, fn_name)
    flags = (is_inputs_tuple, bool(create_graph), bool(strict))
    fn = _compiled(func, fn_name, flags, lambda g: _hvp_like(g, fn_name, *flags))
    return fn(inputs, v)


def vhp(func, inputs, v=None, create_graph=False, strict=False):
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


def hvp(func, inputs, v=None, create_graph=False, strict=False):
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
