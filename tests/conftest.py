import jax
import pytest

# Catch silent upcasts and broadcasts, as Equinox and Lineax do.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    import jax.numpy as jnp

    doctest_namespace["jnp"] = jnp
    doctest_namespace["jax"] = jax
