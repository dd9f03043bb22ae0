"""vtadl-jax: VT-ADL and patch-Gaussian anomaly detection and localisation in JAX/Flax."""

__version__ = "0.1.0"
