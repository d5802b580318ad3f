import jax

# Catch silent upcasts and broadcasts, as Equinox and Lineax do.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
