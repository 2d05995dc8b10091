"""tsallis_jax: GARL and PAFT on the Tsallis loss continuum (arXiv 2604.25907) in JAX/Flax."""
