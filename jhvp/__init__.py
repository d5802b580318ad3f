"""jhvp: Hessian-vector products for JAX programs.

Forward-over-reverse (`jax.jvp` of `jax.grad`), over any pytree of parameters, jit-compiled and
cached, composable with `jax.jit`, `jax.vmap` and sharded inputs. `jhvp.compat` mirrors
`torch.autograd.functional`.

Examples:
    >>> import jax, jax.numpy as jnp, jhvp
    >>> f = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)  # w differentiated, x data
    >>> w, x = jnp.ones(3), jnp.eye(3)
    >>> hv = jhvp.hvp(f, (w, x), jnp.array([1.0, 0.0, 0.0]))
    >>> bool(jnp.allclose(hv, jax.hessian(f)(w, x)[:, 0]))
    True
"""

import importlib.metadata as _metadata

from . import curvature as curvature
from ._data import Batches as Batches
from ._data import StreamedOperator as StreamedOperator
from ._data import batches as batches
from ._ggn import FisherOperator as FisherOperator
from ._ggn import GGNOperator as GGNOperator
from ._ggn import empirical_fisher_operator as empirical_fisher_operator
from ._ggn import ggn_operator as ggn_operator
from ._hessian import HessianOperator as HessianOperator
from ._hessian import hessian_operator as hessian_operator
from ._hvp import hvp as hvp
from ._hvp import value_grad_hvp as value_grad_hvp
from ._hvp import vhp as vhp
from ._typing import Operator as Operator
from .interop import ScipyObjective as ScipyObjective
from .interop import scipy_objective as scipy_objective
from .interop import to_lineax as to_lineax
from .interop import to_scipy as to_scipy

try:
    __version__ = _metadata.version("jhvp")
except _metadata.PackageNotFoundError:  # imported from a source tree that was not installed
    __version__ = "0+unknown"
del _metadata

__all__ = [
    "Batches",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "Operator",
    "ScipyObjective",
    "StreamedOperator",
    "batches",
    "empirical_fisher_operator",
    "ggn_operator",
    "hessian_operator",
    "hvp",
    "scipy_objective",
    "to_lineax",
    "to_scipy",
    "value_grad_hvp",
    "vhp",
]
