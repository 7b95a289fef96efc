"""cgh: pretrain CGH and evaluate any ResNet checkpoint."""
__version__ = "0.1.0"
