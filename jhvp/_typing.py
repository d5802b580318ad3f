"""Type aliases shared by the public signatures; the lists of valid values come from them."""

from typing import Any, Literal, TypeAlias, get_args

PyTree: TypeAlias = Any
"""Any JAX pytree: arrays, scalars, and nests of tuples, lists, dicts, NamedTuples, dataclasses."""

Mode: TypeAlias = Literal["fwd_rev", "rev_rev", "rev_fwd"]
"""The automatic-differentiation route used to form H·v."""

Strategy: TypeAlias = Literal["auto", "linearize", "recompute"]
"""How a `HessianOperator` applies H: stored linearization residuals, or a fresh pass."""

MODES: tuple[str, ...] = get_args(Mode)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
