"""robustreg: regularizers for robust piecewise-affine networks."""
__version__ = "0.1.0"
