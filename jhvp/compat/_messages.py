"""torch.autograd.functional's message texts, copied from torch/autograd/functional.py (2.x).

Quirks included ("isonly", "input {i}" naming an output index): ported code may match on them.
"""

STRICT_OUT = (
    "Output {i} of the user-provided function does not require gradients."
    " The outputs must be computed in a differentiable manner from the input"
    " when running in strict mode."
)


STRICT_INDEPENDENT = (
    "The output of the user-provided function is independent of input {i}."
    " This is not allowed in strict mode."
)


STRICT_JAC_CONST = (
    "While computing the hessian, found that the jacobian of the user-provided"
    " function with respect to input {i} is independent of the input. This is not"
    " allowed in strict mode. You should ensure that your function is twice"
    " differentiable and that the jacobian depends on the inputs (this would be"
    " violated by a linear function for example)."
)


STRICT_JAC_INDEPENDENT = (
    "The jacobian of the user-provided function is independent of input {i}."
    " This is not allowed in strict mode."
)


STRICT_CG_JAC = (
    "The jacobian of the user-provided function is independent of input {i}."
    " This is not allowed in strict mode when create_graph=True."
)


STRICT_CG_HESS = (
    "The hessian of the user-provided function is independent of input {i}."
    " This is not allowed in strict mode when create_graph=True."
)


STRICT_JACOBIAN_PAIR = (
    "Output {i} of the user-provided function is independent of input {k}."
    " This is not allowed in strict mode."
)


JAC_STRICT_VECTORIZE = (
    "torch.autograd.functional.jacobian: `strict=True` and `vectorized=True` are not supported"
    " together. Please either set `strict=False` or `vectorize=False`."
)


JAC_FWD_STRICT = (
    "torch.autograd.functional.jacobian: `strict=True` and `strategy=\"forward-mode\"` are not"
    " supported together (yet). Please either set `strict=False` or"
    " `strategy=\"reverse-mode\"`."
)


JAC_FWD_CREATE_GRAPH = (
    "torch.autograd.functional.jacobian: `create_graph=True` and `strategy=\"forward-mode\"` are"
    " not supported together (yet). Please either set `create_graph=False` or"
    " `strategy=\"reverse-mode\"`."
)


JAC_FWD_VECTORIZE = (
    "Computing Jacobian using forward-AD or forward-over-reverse Hessian is"
    "only implemented for `vectorize=True`."
)


JAC_STRATEGY = (
    'Expected strategy to be either "forward-mode" or "reverse-mode". Hint: If your '
    'function has more outputs than inputs, "forward-mode" tends to be more performant. '
    'Otherwise, prefer to use "reverse-mode".'
)


HESS_STRATEGY = 'Expected strategy to be either "forward-mode" or "reverse-mode".'


V_NONE_INPUT = (
    "The vector v can only be None if the input to the user-provided function is a single"
    " Tensor with a single element."
)


V_NONE_OUTPUT = (
    "The vector v can only be None if the user-provided function returns a single Tensor"
    " with a single element."
)


OUTPUTS = "outputs of the user-provided function"


def size(shape: tuple) -> str:
    return f"torch.Size({list(shape)})"
