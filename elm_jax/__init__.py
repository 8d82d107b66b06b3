"""elm-jax: Expert Language Models in JAX, Flax and seqio."""

__version__ = "0.1.0"
