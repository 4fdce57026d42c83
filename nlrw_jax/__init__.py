"""nlrw_jax: partially rewrite a transformer in natural language, in JAX/Flax."""

__version__ = "0.1.0"
