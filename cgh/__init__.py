"""cgh: pretrain CGH and evaluate any ResNet checkpoint.

Importing it changes nothing in the process (no environment variables, no global settings): PyTorch's
huge-page allocation (``THP_MEM_ALLOC_ENABLE=1``) is the user's choice (BENCHMARKS.md: it made the
first kNN search of a fresh process slower on the 2-core VM).
"""

__version__ = "0.1.0"
