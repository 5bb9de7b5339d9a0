"""gpd_jax: Gap Preserving Distillation (Guo et al., ICLR 2025) in JAX/Flax."""

__version__ = "0.1.0"
