"""Type aliases shared by the public signatures; the lists of valid values come from them."""

from typing import Any, Literal, Protocol, TypeAlias, get_args

PyTree: TypeAlias = Any
"""Any JAX pytree: arrays, scalars, and nests of tuples, lists, dicts, NamedTuples, dataclasses."""

Mode: TypeAlias = Literal["fwd_rev", "rev_rev", "rev_fwd"]
"""The automatic-differentiation route used to form H·v."""

Strategy: TypeAlias = Literal["auto", "linearize", "recompute"]
"""How a `HessianOperator` applies H: stored linearization residuals, or a fresh pass."""

Reduction: TypeAlias = Literal["mean", "sum"]
"""How a dataset operator combines its batches: their mean (weighted by size) or their sum."""

MODES: tuple[str, ...] = get_args(Mode)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
STRATEGIES: tuple[str, ...] = get_args(Strategy)


class Operator(Protocol):
    """What `jhvp.curvature`, `jhvp.to_scipy` and `jhvp.to_lineax` accept: a symmetric linear map.

    Every jhvp operator (`HessianOperator`, `GGNOperator`, `FisherOperator`, `StreamedOperator`)
    is one, and so is any callable `v -> A v` on pytrees; a plain callable also needs `like=` (the
    structure of v) where it is used, since it cannot say what it acts on.

    Examples:
        >>> import jax.numpy as jnp, jhvp
        >>> A = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
        >>> op: jhvp.Operator = lambda v: A @ v
        >>> print(jhvp.curvature.diagonal_exact(op, like=jnp.zeros(3)).estimate)
        [1. 2. 3.]
    """

    def __call__(self, v: PyTree, /) -> PyTree:
        """Returns A·v, with the structure of v."""
        ...
