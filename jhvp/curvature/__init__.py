"""Curvature analysis with Hessian-vector products: eigenpairs, traces, diagonals, densities.

Every function takes an operator: a `jhvp.HessianOperator` (or another jhvp operator with the
same protocol), or any symmetric linear callable `v -> A v` on pytrees together with `like=`, a
pytree of arrays or `jax.ShapeDtypeStruct` with the structure of v. Each call runs as one
compiled program with the operator's arrays as arguments; it composes with `jax.jit`. Over a
`jhvp.StreamedOperator` (a dataset streamed from the host, `data=` a re-iterable of batches)
the same algorithm runs its loops from Python, each step compiled once (`progress=True` shows
a bar).
Randomised methods take a PRNG key and draw probe i from `jax.random.fold_in(key, i)`, so
`batch_size` changes memory use, and results only by rounding. Budgets count operator
applications (`num_matvecs`), and results are NamedTuples.

Examples:
    >>> import jax, jax.numpy as jnp, jhvp
    >>> f = lambda w: jnp.sum(jnp.array([1.0, 2.0, 3.0]) * w ** 2)  # H = diag(2, 4, 6)
    >>> op = jhvp.hessian_operator(f, (jnp.zeros(3),))
    >>> out = jhvp.curvature.eigh(op, jax.random.key(0), k=1, num_matvecs=3)
    >>> print(jnp.round(out.eigenvalues, 4))
    [6.]
"""

from ._density import SpectralDensity as SpectralDensity
from ._density import spectral_density as spectral_density
from ._diagonal import DiagonalResult as DiagonalResult
from ._diagonal import diagonal as diagonal
from ._diagonal import diagonal_exact as diagonal_exact
from ._eigh import EighResult as EighResult
from ._eigh import eigh as eigh
from ._eigh import power_iteration as power_iteration
from ._lanczos import LanczosResult as LanczosResult
from ._lanczos import lanczos as lanczos
from ._solve import SolveResult as SolveResult
from ._solve import solve as solve
from ._trace import TraceResult as TraceResult
from ._trace import trace as trace

__all__ = [
    "DiagonalResult",
    "EighResult",
    "LanczosResult",
    "SolveResult",
    "SpectralDensity",
    "TraceResult",
    "diagonal",
    "diagonal_exact",
    "eigh",
    "lanczos",
    "power_iteration",
    "solve",
    "spectral_density",
    "trace",
]
