"""A drop-in for `torch.autograd.functional`, for functions written with `jax.numpy`.

`vjp, jvp, jacobian, hessian, hvp, vhp` take the same arguments, return the same structures
(array in, array out; tuple in, tuple out; nested tuples for `jacobian` and `hessian`) and raise
the same exception types with the same messages as PyTorch 2.x, so a port changes the import and
writes the function with `jax.numpy`. Each call is jit-compiled once per function and input
signature and reused.

Examples:
    >>> import jax.numpy as jnp
    >>> from jhvp.compat import hvp
    >>> out, hv = hvp(lambda x, y: jnp.sum(x ** 2 * y), (jnp.ones(2), jnp.ones(2)),
    ...               (jnp.ones(2), jnp.zeros(2)))
    >>> print(out, *hv)
    2.0 [2. 2.] [2. 2.]

Deliberate differences from torch:

- **strict=True** is decided from the traced program (jaxpr) dependencies, not from an autograd
  graph's wiring. An output or derivative counts as dependent on the inputs when the program
  connects them through floating-point values; `jax.lax.stop_gradient` (torch's `.detach()`) and
  integer casts cut the connection. Where torch's answer depends on how an op's backward is
  written, ours follows the maths of the program: under strict+create_graph torch rejects
  `(a * a).sum()` but accepts `a.pow(2).sum()`; jhvp rejects both (the Hessian-vector product of
  either does not depend on `a`). JAX has no `requires_grad_()`, so torch's "disconnected output
  that requires grad" (`a.long().float().requires_grad_()`) has no analogue: the nearest JAX
  function, `a.astype(int).astype(float)`, gets torch's message for a detached output.
  A `lax.scan` is followed through its carry (a chain a -> b -> c across iterations connects
  a to c); `while_loop` and `cond` are treated as connecting every input to every output, so
  strict mode can only be more permissive there, never raise where torch would not.
- **Inputs** may be JAX arrays, NumPy arrays or Python floats (torch wants Tensors); integer
  arrays raise torch's RuntimeError, since they cannot be differentiated.
- **create_graph=False** wraps the results in `jax.lax.stop_gradient`; `jax.grad` through them
  gives zeros, as torch's detached tensors give no gradient.
- **Speed**: `hvp` is forward-over-reverse here, the fast route, while torch's note recommends
  `vhp`. `jvp` is native forward mode (torch uses the double-backward trick). `jacobian` and
  `hessian` are always vectorized (`jax.jacrev`/`jax.jacfwd`); `vectorize` only changes which
  argument combinations are accepted, as in torch.
- **func must be traceable by JAX** (it is jit-compiled): Python control flow on array values
  needs `jax.lax.cond`/`jnp.where`, and it must not return non-array values.
- **dtypes** follow JAX: float32 unless `jax_enable_x64` is on.
"""

from ._functional import hessian as hessian
from ._functional import hvp as hvp
from ._functional import jacobian as jacobian
from ._functional import jvp as jvp
from ._functional import vhp as vhp
from ._functional import vjp as vjp

# torch.autograd.functional.__all__, in torch's order.
__all__ = ["vjp", "jvp", "jacobian", "hessian", "hvp", "vhp"]
