"""Open an untrusted checkpoint file without running anything in it.

A pickle can name any importable callable and have it called while loading (``__reduce__``), so a
checkpoint from elsewhere is never given to plain ``pickle``/``torch.load``:

- torch files (``.pth``, ``.pt``, ``.tar``, ...) go through ``torch.load(weights_only=True)``, whose
  unpickler admits tensors and plain containers; we add only harmless value types (``argparse.Namespace``,
  which DINO and others store their arguments in, and numpy arrays/scalars).
- ``.pkl`` files (detectron2, Detectron) go through ``RestrictedUnpickler``: numpy arrays, dtypes and
  scalars, ``collections.OrderedDict`` and the built-in containers; every other global is refused
  before it is imported.
- ``.safetensors`` holds raw tensors and a JSON header: read natively.

Anything refused, truncated or corrupt becomes one ``CheckpointError`` that says which.
"""
from __future__ import annotations

import argparse
import io
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cgh.errors import CghError


class CheckpointError(CghError):
    """A checkpoint cannot be read safely, has no recognisable backbone, or does not fit."""


# (module, name) pairs a .pkl may reference. numpy moved ``core`` to ``_core`` in 2.0; old pickles
# name the former. ``_codecs.encode`` is how protocol-2 pickles (Python 2 era Detectron files) store bytes.
PKL_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [(mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
     for name in ("_reconstruct", "scalar")]
    + [(mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode")]
    + [("numpy.dtypes", name) for name in dir(np.dtypes) if name.endswith("DType")]
)


def _torch_safe_globals() -> list:
    """Harmless value types that ``torch.load(weights_only=True)`` should accept besides its own."""
    numpy_core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [argparse.Namespace, np.ndarray, np.dtype, numpy_core.multiarray._reconstruct,
            numpy_core.multiarray.scalar, *dtypes]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that imports nothing outside ``PKL_ALLOWED``, so loading cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in PKL_ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return super().find_class(module, name)


def _refused(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused to load: the file references {what}, which could run code when loaded; "
        "only tensors, numpy arrays and plain containers are accepted from untrusted checkpoints")


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: truncated or corrupt checkpoint file "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})")


def load_pickle(path: Path):
    """Read a ``.pkl`` with ``RestrictedUnpickler`` (latin1 so Python 2 era pickles still decode)."""
    data = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        m = re.search(r"global '([^']+)' is not allowed", str(e))
        if m:
            raise _refused(path, f"'{m.group(1)}'") from None
        raise _corrupt(path, e) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise _corrupt(path, e) from None


def load_torch(path: Path):
    """``torch.load(weights_only=True)`` with the extra harmless types; clear errors otherwise."""
    try:
        with torch.serialization.safe_globals(_torch_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", text)
        if m:
            raise _refused(path, f"'{m.group(1)}'") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        raise _corrupt(path, pickle.UnpicklingError(detail.group(1) if detail else text)) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError, OSError,
            TypeError, AttributeError, IndexError, UnicodeDecodeError, OverflowError) as e:
        raise _corrupt(path, e) from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from None


def read_checkpoint(path: str | Path):
    """The object stored in ``path`` (any supported file kind), loaded without executing code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; a .pkl (or a bare pickle under another name) is a pickle stream.
    if path.suffix == ".pkl" or (head[:1] == b"\x80" and not _is_legacy_torch(path)):
        return load_pickle(path)
    return load_torch(path)


def _is_legacy_torch(path: Path) -> bool:
    """Pre-1.6 ``torch.save`` files are pickle streams starting with torch's magic number."""
    with open(path, "rb") as f:
        head = f.read(16)
    return head.startswith(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19")
