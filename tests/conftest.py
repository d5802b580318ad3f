import jax
from hypothesis import settings

# Property tests draw the same examples on every run: CI failures reproduce, and never flake.
settings.register_profile("jhvp", derandomize=True, print_blob=True)
settings.load_profile("jhvp")

# Catch silent upcasts and broadcasts, as Equinox and Lineax do.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
