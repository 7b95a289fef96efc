"""cgh: pretrain CGH and evaluate any ResNet checkpoint."""
import os

__version__ = "0.1.0"

# Large CPU tensors on transparent huge pages, as numpy already does for its arrays: PyTorch's own
# switch, read at its first allocation, so it is set here, before anything of cgh imports torch.
# A fresh 400 MB buffer otherwise faults in 4 KiB pages: 0.08-0.6 s against 0.04 s to fill it
# (the kNN search allocates three buffers of 100-400 MB; BENCHMARKS.md). THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
