"""Argument handling in torch's order: what counts as a Tensor here, and the checks of v."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _messages as msg

# Arrays, and Python floats where torch would want a 0-d tensor (ints stay rejected, as in torch,
# so `(x, 2)` is still the error torch's tests expect). Plain tuples: isinstance is faster on them.
INPUT_TYPES = (jax.Array, np.ndarray, np.generic, float)


OUTPUT_TYPES = (jax.Array, np.ndarray, np.generic)


FLOATING: dict = {}  # dtype -> is it floating; jnp.issubdtype costs ~1 µs a call


def is_array(x: Any) -> bool:
    return isinstance(x, INPUT_TYPES)


def is_output_array(x: Any) -> bool:
    return isinstance(x, OUTPUT_TYPES)


def is_floating(dtype) -> bool:
    known = FLOATING.get(dtype)
    if known is None:
        known = FLOATING[dtype] = bool(jnp.issubdtype(dtype, jnp.floating))
    return known


def as_tuple(inp: Any, arg_name: str, fn_name: str, accept=is_array) -> tuple[bool, tuple]:
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


def as_inputs(inputs: Any, fn_name: str) -> tuple[bool, tuple]:
    is_tuple, items = as_tuple(inputs, "inputs", fn_name)
    arrays = []
    for x in items:
        if isinstance(x, float):
            x = jnp.asarray(x)
        if not is_floating(x.dtype):
            # torch: inputs are made to require grad, which only floating dtypes can.
            raise RuntimeError("only Tensors of floating point dtype can require gradients")
        arrays.append(x)
    return is_tuple, tuple(arrays)


def shape_of(x) -> tuple:
    shape = getattr(x, "shape", None)
    return np.shape(x) if shape is None else tuple(shape)


def validate_v(v: tuple, other_shapes: list[tuple], is_other_tuple: bool) -> None:
    if len(other_shapes) != len(v):
        if is_other_tuple:
            raise RuntimeError(
                f"v is a tuple of invalid length: should be {len(other_shapes)} but got {len(v)}."
            )
        raise RuntimeError("The given v should contain a single Tensor.")
    for idx, (el_v, shape) in enumerate(zip(v, other_shapes, strict=True)):
        if shape_of(el_v) != tuple(shape):
            prepend = f"Entry {idx} in " if is_other_tuple else ""
            raise RuntimeError(
                f"{prepend}v has invalid size: should be {msg.size(shape)} but got "
                f"{msg.size(np.shape(el_v))}."
            )


def v_for_inputs(v, inputs: tuple, is_inputs_tuple: bool, fn_name: str):
    """hvp/vhp/jvp: v is checked against the inputs before func is called."""
    if v is None:
        if len(inputs) != 1 or np.size(inputs[0]) != 1:
            raise RuntimeError(msg.V_NONE_INPUT)
        return None
    _, v = as_tuple(v, "v", fn_name)
    validate_v(v, [shape_of(x) for x in inputs], is_inputs_tuple)
    return v


def call_func(func: Callable, inputs: tuple, fn_name: str, arg_name: str = msg.OUTPUTS):
    out = func(*inputs)
    is_tuple, outs = as_tuple(out, arg_name, fn_name, accept=is_output_array)
    return is_tuple, tuple(jnp.asarray(o) for o in outs)


def cast_like(v: tuple, refs: tuple) -> tuple:
    return tuple(jnp.asarray(t, jnp.result_type(r)) for t, r in zip(v, refs, strict=True))


def post(res: Sequence, is_tuple: bool) -> Any:
    return res if is_tuple else res[0]


def detach(tree, create_graph: bool):
    return tree if create_graph else jax.lax.stop_gradient(tree)
