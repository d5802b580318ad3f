"""Type aliases shared by the public signatures."""

from typing import Any, Literal, TypeAlias

PyTree: TypeAlias = Any
"""Any JAX pytree: arrays, scalars, and nests of tuples, lists, dicts, NamedTuples, dataclasses."""

Mode: TypeAlias = Literal["fwd_rev", "rev_rev", "rev_fwd"]
"""The automatic-differentiation route used to form H·v."""

MODES: tuple[str, ...] = ("fwd_rev", "rev_rev", "rev_fwd")
