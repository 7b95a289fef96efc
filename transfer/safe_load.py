"""Open an untrusted checkpoint file without running anything in it, and without letting it size our memory.

A pickle can name any importable callable and have it called while loading (``__reduce__``), so a
checkpoint from elsewhere is never given to plain ``pickle``/``torch.load``:

- torch files (``.pth``, ``.pt``, ``.tar``, ...) go through ``torch.load(weights_only=True)``, whose
  unpickler admits tensors and plain containers; we add only harmless value types (``argparse.Namespace``,
  which DINO and others store their arguments in, and numpy arrays/scalars).
- ``.pkl`` files (detectron2, Detectron) go through ``RestrictedUnpickler``: numpy arrays, dtypes and
  scalars, ``collections.OrderedDict`` and the built-in containers; every other global is refused
  before it is imported.
- ``.safetensors`` holds raw tensors and a JSON header: read natively.

A pickle also declares sizes that loaders allocate before reading the data: a bytes length, a memo
index, a numpy shape, a torch storage's element count, ``bytearray(n)``. A 10 KB file can ask for a
terabyte. So every declared size is checked against the file's real size before anything is
allocated (``_check_opcodes``, the numpy stand-ins below, ``_scan_torch``); the numpy bytes one file
may make us allocate add up to at most its size.

Anything refused, truncated or corrupt becomes one ``CheckpointError`` that says which.
"""
from __future__ import annotations

import argparse
import collections
import contextvars
import io
import math
import pickle
import pickletools
import re
import zipfile
from contextlib import contextmanager
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cgh.errors import CghError


class CheckpointError(CghError):
    """A checkpoint cannot be read safely, has no recognisable backbone, or does not fit."""


class _Unsafe(Exception):
    """Raised inside an unpickler: the file asks for something we refuse (becomes a CheckpointError)."""


class _TooLarge(_Unsafe):
    """The file declares more bytes than it holds: truncated, corrupt or hostile, refused either way."""


# ---- numpy, checked ------------------------------------------------------------------------------
# numpy's pickles call ``_reconstruct`` then ``ndarray.__setstate__`` (BUILD), ``_frombuffer`` or
# ``scalar``. Each states a shape and a dtype that numpy allocates as told, and the dtype itself can
# be forged by BUILD (an object dtype flagged as plain bytes makes numpy read pointers from the file:
# a crash). The stand-ins below check both, then call numpy.

_BUDGET: contextvars.ContextVar[list | None] = contextvars.ContextVar("cgh_numpy_budget", default=None)


@contextmanager
def _numpy_budget(nbytes: int):
    """Let the numpy constructors of one load allocate ``nbytes`` in total (the file's size)."""
    token = _BUDGET.set([nbytes, nbytes])
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _charge(nbytes: int, what: str) -> None:
    budget = _BUDGET.get()
    if budget is None or nbytes > budget[0]:
        limit = budget[1] if budget else 0
        raise _TooLarge(f"it declares {what} of {nbytes} bytes, more than the {limit} bytes the file "
                        "holds; refused before allocating")
    budget[0] -= nbytes


def _plain_dtype(dtype) -> np.dtype:
    """``dtype`` if it is exactly what numpy itself builds for its type string, else refused."""
    if isinstance(dtype, (bytes, str)):
        dtype = np.dtype(dtype)
    if not isinstance(dtype, np.dtype):
        raise _Unsafe(f"it gives a numpy array a {type(dtype).__name__} as its dtype")
    try:
        fresh = np.dtype(dtype.str) if dtype.fields is None and dtype.subdtype is None else None
    except TypeError:
        fresh = None
    if fresh is None or (dtype.flags, dtype.itemsize, dtype.alignment, dtype.kind) != \
            (fresh.flags, fresh.itemsize, fresh.alignment, fresh.kind):
        raise _Unsafe("it holds a numpy dtype whose stored flags or size differ from its type (forged or structured)")
    return dtype


def _count(shape) -> int:
    if not isinstance(shape, tuple) or len(shape) > 64 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _Unsafe("it holds a numpy array with a malformed shape")
    return math.prod(shape)


class _CheckedArray(np.ndarray):
    """Stands in for ``numpy.ndarray`` while unpickling: its state is checked before numpy sizes it."""

    def __new__(cls, *args, **kwargs):
        raise _Unsafe("it calls numpy.ndarray(...) directly, which numpy's own pickles never do")

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Unsafe("it holds a numpy array with a malformed pickled state")
        shape, dtype, _, raw = state[-4:]
        dtype, n = _plain_dtype(dtype), _count(shape)
        if dtype.hasobject and not (isinstance(raw, list) and len(raw) == n):
            raise _Unsafe("it holds a numpy object array whose element list does not match its shape")
        _charge(n * dtype.itemsize, f"a numpy array {shape} of {dtype}")
        super().__setstate__(state)

    def __reduce_ex__(self, protocol):
        return self.view(np.ndarray).__reduce_ex__(protocol)   # pickled again: a plain ndarray


_np_core = getattr(np, "_core", None) or np.core
_np_reconstruct, _np_scalar = _np_core.multiarray._reconstruct, _np_core.multiarray.scalar
_np_frombuffer = _np_core.numeric._frombuffer


def _reconstruct(subtype, shape, dtype):
    if subtype is not _CheckedArray:
        raise _Unsafe("it asks numpy's _reconstruct for something other than an ndarray")
    dtype = _plain_dtype(dtype)
    _charge(_count(shape) * dtype.itemsize, f"a numpy array {shape}")
    return _np_reconstruct(_CheckedArray, shape, dtype)


def _scalar(dtype, data=None):
    dtype = _plain_dtype(dtype)
    if not dtype.hasobject and not (isinstance(data, (bytes, str)) and len(data) == dtype.itemsize):
        raise _Unsafe(f"it holds a numpy scalar whose data does not match its dtype {dtype}")
    _charge(dtype.itemsize, f"a numpy scalar of {dtype}")
    return _np_scalar(dtype) if data is None else _np_scalar(dtype, data)


def _frombuffer(buf, dtype, shape, order):
    dtype, n = _plain_dtype(dtype), _count(shape)
    if dtype.hasobject or not isinstance(buf, (bytes, bytearray)) or len(buf) != n * dtype.itemsize:
        raise _Unsafe("it holds a numpy buffer whose size does not match its shape and dtype")
    _charge(len(buf), f"a numpy array {shape} of {dtype}")
    return _np_frombuffer(buf, dtype, shape, order)


def _empty_bytes(*args):
    """``bytes()``: how protocol 2 stores an empty bytes value (``bytes(n)`` would allocate n)."""
    if args:
        raise _Unsafe("it calls bytes(...) with arguments, which pickles of bytes never do")
    return b""


_TEXT_CODECS = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii"})


def _encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` for protocol-2 bytes (str -> latin1); bytes-to-bytes codecs such as hex
    would double a value at each nesting level, so only text encodings of a str are allowed."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _TEXT_CODECS \
            or errors != "strict":
        raise _Unsafe("it calls _codecs.encode with something other than a text encoding of a string")
    return text.encode(encoding, errors)


# What a .pkl may name, and what it gets: one table, also handed to torch's unpickler. numpy moved
# ``core`` to ``_core`` in 2.0 (old pickles name the former); protocol-2 pickles (Python 2 era
# Detectron files) store bytes as ``_codecs.encode(text, 'latin1')`` and empty bytes as ``bytes()``.
_SAFE_GLOBALS: dict[str, object] = {
    **{f"{mod}.{name}": fn for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name, fn in (("_reconstruct", _reconstruct), ("scalar", _scalar))},
    **{f"{mod}._frombuffer": _frombuffer for mod in ("numpy.core.numeric", "numpy._core.numeric")},
    "numpy.ndarray": _CheckedArray, "numpy.dtype": np.dtype,
    **{f"numpy.dtypes.{name}": getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")},
    "collections.OrderedDict": collections.OrderedDict, "_codecs.encode": _encode,
    "__builtin__.bytes": _empty_bytes, "builtins.bytes": _empty_bytes,
}


def _torch_safe_globals() -> list:
    """Harmless value types that ``torch.load(weights_only=True)`` should accept besides its own
    (``_codecs.encode`` is torch's own; its other uses are refused by ``_scan_torch``)."""
    return [argparse.Namespace, *((obj, name) for name, obj in _SAFE_GLOBALS.items()
                                  if name not in ("collections.OrderedDict", "_codecs.encode", "__builtin__.bytes"))]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that imports nothing: globals outside ``_SAFE_GLOBALS`` are refused, the rest
    come from it (numpy's constructors replaced by checking stand-ins)."""

    def find_class(self, module: str, name: str):
        if f"{module}.{name}" not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return _SAFE_GLOBALS[f"{module}.{name}"]


# ---- opcodes, without running them ---------------------------------------------------------------

def _check_opcodes(data: bytes, start: int = 0) -> int:
    """Walk one pickle's opcodes (nothing is built) and return where it ends.

    CPython's C unpickler allocates a declared bytes length before reading it and grows its memo to
    any index a PUT names; ``pickletools.genops`` reads each argument from the bytes that are really
    there, so a length that overruns the file fails here, and memo indices must stay below the
    number of opcodes (picklers number them in order).
    """
    f = io.BytesIO(data)
    f.seek(start)
    seen = 0
    try:
        for op, arg, _ in pickletools.genops(f):
            seen += 1
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > seen:
                raise _TooLarge(f"it declares memo slot {arg} after only {seen} opcodes")
            if op.name == "FRAME" and arg > len(data) - f.tell():
                raise ValueError(f"a frame of {arg} bytes with {len(data) - f.tell()} left")
    except (ValueError, OverflowError) as e:
        raise pickle.UnpicklingError(str(e).splitlines()[0] if str(e) else "malformed opcodes") from None
    return f.tell()


def _refused(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused to load: the file references {what}, which could run code when loaded; "
        "only tensors, numpy arrays and plain containers are accepted from untrusted checkpoints")


def _unsafe(path: Path, err: _Unsafe) -> CheckpointError:
    if isinstance(err, _TooLarge):
        return CheckpointError(f"{path}: truncated or corrupt checkpoint file ({err})")
    return CheckpointError(f"{path}: refused to load: {err}")


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: truncated or corrupt checkpoint file "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})")


def load_pickle(path: Path):
    """Read a ``.pkl`` with ``RestrictedUnpickler`` (latin1 so Python 2 era pickles still decode)."""
    data = path.read_bytes()
    try:
        _check_opcodes(data)
        with _numpy_budget(len(data)):
            return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _Unsafe as e:
        raise _unsafe(path, e) from None
    except pickle.UnpicklingError as e:
        m = re.search(r"global '([^']+)' is not allowed", str(e))
        if m:
            raise _refused(path, f"'{m.group(1)}'") from None
        raise _corrupt(path, e) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise _corrupt(path, e) from None


# ---- torch files: a dry run over the pickle before torch.load ------------------------------------

def _torch_sized_calls() -> dict[str, int]:
    """Globals torch's weights_only unpickler lets a file call with a size it then allocates:
    name -> bytes per declared element (an upper bound)."""
    calls = {f"{c.__module__}.{c.__name__}": 8 for c in (*torch._tensor_classes, torch.Tensor)}
    calls.update({"torch.storage.UntypedStorage": 1, "torch.storage.TypedStorage": 8,
                  "builtins.bytearray": 1, "torch._utils._rebuild_qtensor": 8})
    return calls


class _Declared:
    """What a dry run found: storages (key -> bytes) and what sized calls may still allocate."""

    def __init__(self, limit: int):
        self.limit = self.left = limit
        self.storages: dict[str, int] = {}
        self.stubs: dict[str, type] = {}


class _Stub:
    """Every global in the dry run: accepts any call, item, append or state and runs nothing.
    Calls to sized constructors are checked (``_TorchScan.call``)."""
    scan: "_TorchScan"
    name = ""
    itemsize = 8   # for storages: bytes per element

    def __new__(cls, *args):
        cls.scan.call(cls.name, args)
        return object.__new__(cls)

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def add(self, item):
        pass


def _is_stub(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, _Stub)


class _TorchScan(pickle.Unpickler):
    """Unpickles a torch pickle with a stub for every global, only to read the sizes it declares:
    persistent ids (storages) and the sizes passed to the constructors of ``_torch_sized_calls``."""
    SIZED = _torch_sized_calls()

    def __init__(self, file, declared: _Declared):
        super().__init__(file, encoding="latin1")
        self.declared = declared

    def find_class(self, module: str, name: str):
        module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
        full, stubs = f"{module}.{name}", self.declared.stubs   # as torch's unpickler names it
        if full not in stubs:
            if len(stubs) >= 10_000:
                raise _Unsafe("it names more than 10000 distinct globals")
            stubs[full] = type("Stub", (_Stub,), {"scan": self, "name": full})
        return stubs[full]

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel[, view]): what torch allocates for it
        if isinstance(pid, tuple) and len(pid) >= 5 and _is_stub(pid[1]) and isinstance(pid[4], int):
            itemsize = _storage_itemsize(pid[1].name)
            if itemsize is not None and pid[4] >= 0:
                key = str(pid[2])
                self.declared.storages[key] = max(self.declared.storages.get(key, 0), pid[4] * itemsize)
                stubs, kind = self.declared.stubs, f"storage of {pid[1].name}"
                if kind not in stubs:
                    stubs[kind] = type("Storage", (_Stub,), {"scan": self, "name": kind, "itemsize": itemsize})
                return stubs[kind]
        return None   # not a storage torch would load: torch.load refuses it itself

    def call(self, name: str, args: tuple) -> None:
        while name == "torch._tensor._rebuild_from_type_v2" and len(args) >= 3 and _is_stub(args[0]) \
                and isinstance(args[2], tuple):
            name, args = args[0].name, args[2]   # it calls args[0](*args[2])
        if name == "_codecs.encode":
            _encode(*args[:3]) if args else _encode(None)
        elif name in self.SIZED:
            per = self.SIZED[name]
            if name == "torch._utils._rebuild_qtensor":   # (storage, offset, size, stride, ...)
                per, args = (args[0].itemsize if args and _is_stub(args[0]) else 8), args[2:3]
            ints = _ints(args)
            nbytes = math.prod(ints) * per if ints else 0
            if nbytes > self.declared.left:
                raise _TooLarge(f"it asks {name} for {nbytes} bytes, more than the {self.declared.limit} "
                                "bytes the file holds; refused before allocating")
            self.declared.left -= nbytes


def _ints(args) -> list[int]:
    """The integers in ``args`` and in sequences among them (how sizes are passed)."""
    out = []
    for a in args:
        items = a if isinstance(a, (tuple, list)) else (a,)
        out += [x for x in items if isinstance(x, int) and not isinstance(x, bool)]
    return out


def _storage_itemsize(kind: str) -> int | None:
    module, _, name = kind.rpartition(".")
    if module not in ("torch", "torch.storage", "torch.cuda"):
        return None
    if name == "UntypedStorage":
        return 1
    try:
        return torch._utils._element_size(torch.storage._get_dtype_from_pickle_storage_type(name))
    except (KeyError, RuntimeError):
        return None


def _scan_pickles(data: bytes, count: int, limit: int) -> _Declared:
    """Dry-run ``count`` consecutive pickles of ``data`` (legacy files hold several), each with a
    fresh unpickler as torch does."""
    f, declared = io.BytesIO(data), _Declared(limit)
    for _ in range(count):
        _check_opcodes(data, f.tell())
        _TorchScan(f, declared).load()
    return declared


def _scan_torch(path: Path, size: int) -> None:
    """Check what a torch file declares against what it holds, before ``torch.load`` allocates.

    Zip files (torch >= 1.6): every record at most the file's size; every storage at most its
    record (read through torch's own zip reader, so both see the same archive). Legacy files:
    the storages together at most the file's size.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        reader = torch._C.PyTorchFileReader(str(path))
        for name in reader.get_all_records():
            if reader.get_record_size(name) > size:
                raise _TooLarge(f"its zip record '{name}' declares {reader.get_record_size(name)} bytes, "
                                f"more than the file's {size}")
        if not reader.has_record("data.pkl"):
            return   # torch.load says what is missing
        declared = _scan_pickles(bytes(reader.get_record("data.pkl")), 1, size)
        for key, nbytes in declared.storages.items():
            record = f"data/{key}"
            if reader.has_record(record) and nbytes > reader.get_record_size(record):
                raise _TooLarge(f"it declares a tensor storage of {nbytes} bytes where the file holds "
                                f"{reader.get_record_size(record)}; refused before allocating")
        return
    # legacy: magic number, protocol, sys info, then the object with its storages' sizes
    total = sum(_scan_pickles(path.read_bytes(), 4, size).storages.values())
    if total > size:
        raise _TooLarge(f"it declares tensor storages of {total} bytes, more than the file's {size}; "
                        "refused before allocating")


def load_torch(path: Path):
    """``torch.load(weights_only=True)`` with the extra harmless types, after ``_scan_torch``;
    clear errors otherwise."""
    size = path.stat().st_size
    try:
        _scan_torch(path, size)
        with torch.serialization.safe_globals(_torch_safe_globals()), _numpy_budget(size):
            return torch.load(path, map_location="cpu", weights_only=True)
    except _Unsafe as e:
        raise _unsafe(path, e) from None
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", text)
        if m:
            raise _refused(path, f"'{m.group(1)}'") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        raise _corrupt(path, pickle.UnpicklingError(detail.group(1) if detail else text)) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError, OSError,
            TypeError, AttributeError, IndexError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise _corrupt(path, e) from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from None


def read_checkpoint(path: str | Path):
    """The object stored in ``path`` (any supported file kind), loaded without executing code."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
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
