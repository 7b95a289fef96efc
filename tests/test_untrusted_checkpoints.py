"""Untrusted checkpoints cannot hang us, size our memory, leak our environment or pass off bad weights.

Every hostile file is built here, opcode by opcode where needed: a shared-dict "billion laughs"
config, ``${oc.env:...}`` interpolations, numpy/torch/pickle size declarations far beyond the file,
forged numpy dtypes, meta tensors, non-tensors where weights belong, NaN/Inf weights and a canonical
pair torn by a crash. Each must give one clear line (or NOT LOADABLE), fast, with little memory.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from cgh.backbone import backbone_state_dict
from cgh.canonical import load_canonical, save_canonical, sidecar_path
from cgh.cli import main as cgh_main
from cgh.errors import CghError
from transfer.convert import convert_checkpoint
from transfer.hub import CheckpointError, inspect_checkpoint, load_backbone

ROOT = Path(__file__).resolve().parent.parent


# ---- builders ---------------------------------------------------------------------------------------

def resnet18_like(value: float = 0.5) -> dict:
    """Every ResNet-18 backbone tensor at its real shape, stored as one expanded element (tiny files)."""
    with torch.device("meta"):
        shapes = backbone_state_dict(torchvision.models.resnet18(weights=None))
    return {k: torch.tensor(value, dtype=v.dtype).expand(v.shape) for k, v in shapes.items()}


def genuine_config(**changes) -> tuple:
    """(OmegaConf config, the plain dict our trainer stores) of a real PretrainConfig."""
    from cgh.config import to_dict
    from cgh.train import PretrainConfig

    cfg = OmegaConf.structured(PretrainConfig(output_dir="/runs/x"))
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return cfg, to_dict(cfg)


def train_checkpoint(path: Path, config, sd: dict | None = None) -> Path:
    """The "cgh-train" layout: {'model': {'student_backbone.*': ...}, 'config': ..., 'epoch': 3}."""
    model = {f"student_backbone.{k}": v for k, v in (sd or resnet18_like()).items()}
    torch.save({"model": model, "config": config, "epoch": 3}, path)
    return path


def one_line_cli_error(capsys, *argv) -> str:
    assert cgh_main(list(argv)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"cgh {argv[0]}: error:") and "\n" not in err and "Traceback" not in err, err
    return err


# pickle opcodes, protocol 2 (what torch's weights_only unpickler reads)
def op_global(qualname: str) -> bytes:
    module, name = qualname.rsplit(".", 1)
    return b"c" + f"{module}\n{name}\n".encode()


def op_int(n: int) -> bytes:
    return pickle.dumps(n, 2)[2:-1]


def op_str(s: str) -> bytes:
    data = s.encode("utf-8", "surrogatepass")
    return b"X" + len(data).to_bytes(4, "little") + data


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def op_call(qualname: str, *args: bytes) -> bytes:
    return op_global(qualname) + op_tuple(*args) + b"R"


def op_bytes(data: bytes) -> bytes:
    """Protocol 2 stores bytes as ``_codecs.encode(latin1 text, 'latin1')``."""
    return op_call("_codecs.encode", op_str(data.decode("latin1")), op_str("latin1"))


def op_dict(**items: bytes) -> bytes:
    return b"}(" + b"".join(op_str(k) + v for k, v in items.items()) + b"u"


def pickle2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


NP = "numpy._core.multiarray"


def np_array(shape: tuple, dtype: bytes, raw: bytes) -> bytes:
    """numpy's own pickle of an array: _reconstruct(ndarray, (0,), b'b') then BUILD with the state."""
    return (op_call(f"{NP}._reconstruct", op_global("numpy.ndarray"), op_tuple(op_int(0)), op_bytes(b"b"))
            + op_tuple(op_int(1), op_tuple(*map(op_int, shape)), dtype, b"\x89", raw) + b"b")


def np_dtype(code: str, flags: int | None = None, elsize: int = -1) -> bytes:
    """numpy.dtype(code); with ``flags``/``elsize``, BUILD sets the dtype's flags (numpy stores 63
    for objects) or its item size (as numpy's own pickle of a void dtype does)."""
    out = op_call("numpy.dtype", op_str(code), b"\x89", b"\x88")
    if flags is not None or elsize != -1:
        align = 1 if elsize != -1 else -1
        state = (op_int(3), op_str("|"), b"N", b"N", b"N", op_int(elsize), op_int(align), op_int(flags or 0))
        out += op_tuple(*state) + b"b"
    return out


def storage_pid(numel: int, legacy: bool = False) -> bytes:
    fields = [op_str("storage"), op_global("torch.FloatStorage"), op_str("0"), op_str("cpu"), op_int(numel)]
    return op_tuple(*fields, *([b"N"] if legacy else [])) + b"Q"


def tensor_from(pid: bytes, n: int = 4) -> bytes:
    return op_call("torch._utils._rebuild_tensor_v2", pid, op_int(0), op_tuple(op_int(n)),
                   op_tuple(op_int(1)), b"\x89", op_call("collections.OrderedDict"))


def torch_zip(path: Path, data_pkl: bytes) -> Path:
    """A real torch.save zip (one 4-float storage '0') whose data.pkl is replaced."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return path


def torch_legacy(path: Path, main_pickle: bytes) -> Path:
    """A pre-1.6 torch.save stream: magic, protocol, sys info, the object, storage keys, data."""
    head = b"".join(pickle.dumps(x, 2) for x in (0x1950A86A20F9469CFC6C, 1001,
                                                 {"protocol_version": 1001, "little_endian": True}))
    tail = pickle.dumps(["0"], 2) + (4).to_bytes(8, "little") + bytes(16)
    path.write_bytes(head + main_pickle + tail)
    return path


# ---- 1. stored configs are bounded, inert data ----------------------------------------------------

def billion_laughs(levels: int, width: int) -> dict:
    """``width ** levels`` values in a few hundred bytes: each level names the one below ``width`` times."""
    d = {"a": 1}
    for _ in range(levels):
        d = {f"k{i}": d for i in range(width)}
    return d


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bomb, message", [
    ("billion-laughs", r"stored training config is nested deeper than 16 levels"),   # 2**40 values
    ("shared-dag", r"stored training config holds more than 10000 values \(a shared value counts each time\)"),
    ("deep", r"stored training config is nested deeper than 16 levels"),
    ("long-string", r"stored training config holds a string of 100000 characters \(at most 4096\)"),
])
def test_config_bombs_are_refused_fast(bomb, message, tmp_path, capsys):
    _, config = genuine_config()
    if bomb == "billion-laughs":
        config["extra"] = billion_laughs(40, 2)
    elif bomb == "shared-dag":
        config["model"]["extra"] = billion_laughs(12, 10)   # 10**12 values, 13 levels deep
    elif bomb == "deep":
        deep: dict = {}
        for _ in range(100):
            deep = {"d": deep}
        config["extra"] = deep
    else:
        config["method"] = "m" * 100_000
    path = train_checkpoint(tmp_path / "bomb.pth", config)
    assert path.stat().st_size < 300_000
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=message):
        inspect_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        load_backbone(path)   # what `cgh eval knn` and every protocol call
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint(path, "canonical", tmp_path / "out.safetensors")
    assert message.split(" ")[0] in one_line_cli_error(capsys, "inspect", str(path))
    assert time.monotonic() - start < 20
    assert not (tmp_path / "out.safetensors").exists()


def test_interpolations_in_a_stored_config_are_never_resolved(tmp_path, monkeypatch, capsys):
    from cgh.records import write_record

    secret = "cgh-test-secret-7f3a9c"
    monkeypatch.setenv("CGH_TEST_SECRET", secret)
    literal = "${oc.env:CGH_TEST_SECRET}"
    _, config = genuine_config()
    config["method"], config["data"]["dataset"] = literal, "${oc.env:CGH_TEST_SECRET,x}"
    config["loss"]["mode"] = "${method}"
    src = train_checkpoint(tmp_path / "ckpt.pth", config)

    assert cgh_main(["inspect", "--json", str(src)]) == 0
    as_json = capsys.readouterr().out
    assert json.loads(as_json)["method"] == literal and json.loads(as_json)["train"]["loss_mode"] == "${method}"
    assert cgh_main(["inspect", str(src)]) == 0
    as_text = capsys.readouterr().out
    out = tmp_path / "canon" / "bb.safetensors"
    assert cgh_main(["convert", str(src), "--to", "canonical", "-o", str(out)]) == 0
    capsys.readouterr()
    assert load_backbone(out).method == literal   # the sidecar's literal is read back as a literal
    records = []
    for ck in (load_backbone(src), load_backbone(out)):
        records.append(write_record(tmp_path / f"rec{len(records)}", protocol="knn", checkpoint=ck.identity(),
                                    dataset={"name": "d", "split": "val"}, metrics={"top1": 1.0}, config={},
                                    started="t", wall_time_s=1).read_text())
    texts = [as_json, as_text, out.read_bytes().decode("latin1"), sidecar_path(out).read_text(), *records]
    assert all(literal in t for t in texts)
    assert not [t for t in texts if secret in t]


def test_summary_of_a_stored_config_equals_the_trainers(tmp_path):
    """The inert reader gives exactly ``cgh.train.train_config_summary`` for genuine configs."""
    from cgh.inert import train_summary
    from cgh.train import train_config_summary

    for changes in ({}, {"method": "cgh-pred", "model.arch": "resnet18", "model.layers": ["layer2", "layer4"],
                         "model.predictor": True, "data.multi_crop": True, "loss.tau_h": 0.2,
                         "optim.epochs": 7, "data.dataset": "synthshapes"}):
        cfg, stored = genuine_config(**changes)
        expected = train_config_summary(cfg)
        got = train_summary(stored)
        assert got == expected and [type(v) for v in got.values()] == [type(v) for v in expected.values()]
        assert list(got) == list(expected)
        path = train_checkpoint(tmp_path / "ckpt.pth", stored)
        ck = load_backbone(path)
        assert ck.train_config == expected and ck.method == expected["method"]


@pytest.mark.parametrize("change, message", [
    ("not-a-dict", r"stored training config is a list, not a dict"),
    ("method-int", r"stored training config 'method' is a int, not a string"),
    ("layers-int", r"stored training config 'model.layers' is a int, not a list of stage names"),
    ("section-str", r"stored training config 'loss' is a str, not a section"),
    ("tensor-value", r"stored training config holds a Tensor"),
])
def test_malformed_training_configs_give_one_line(change, message, tmp_path, capsys):
    _, config = genuine_config()
    if change == "not-a-dict":
        config = [1, 2]
    elif change == "method-int":
        config["method"] = 5
    elif change == "layers-int":
        config["model"]["layers"] = 3
    elif change == "section-str":
        config["loss"] = "x"
    else:
        config["optim"]["epochs"] = torch.tensor(3)
    path = train_checkpoint(tmp_path / "ckpt.pth", config)
    with pytest.raises(CheckpointError, match=message):
        load_backbone(path)
    assert "stored training config" in one_line_cli_error(capsys, "inspect", str(path))


# ---- 3. declared sizes are checked against the file before anything is allocated -------------------

GiB = 1 << 30


def hostile_files(d: Path) -> dict[str, tuple[Path, str]]:
    """case -> (file, regex its error must match). Each declares gigabytes to terabytes in a few KB."""
    big = 1 << 29   # elements: 4 GiB of float64
    x = b"A" * 8
    cases = {
        "pkl-array-shape": (pickle2(np_array((big,), np_dtype("f8"), op_bytes(x))),
                            r"declares a numpy array \(536870912,\) of float64 of 4294967296 bytes, more than"),
        "pkl-reconstruct-shape": (pickle2(op_call(f"{NP}._reconstruct", op_global("numpy.ndarray"),
                                                  op_tuple(op_int(big)), np_dtype("f8"))),
                                  r"declares a numpy array \(536870912,\) of 4294967296 bytes"),
        "pkl-object-array": (pickle2(np_array((big,), np_dtype("O8"), b"]")),
                             r"numpy object array whose element list does not match its shape"),
        "pkl-short-object-list": (pickle2(np_array((3,), np_dtype("O8"), b"(Nl")),   # [None] for 3 slots
                                  r"numpy object array whose element list does not match its shape"),
        "pkl-forged-object-dtype": (pickle2(np_array((1,), np_dtype("O8", flags=0), op_bytes(x))),
                                    r"numpy dtype whose stored flags or size differ from its type"),
        "pkl-scalar": (pickle2(op_call(f"{NP}.scalar", np_dtype("V8", elsize=(1 << 31) - 1), op_bytes(b"x"))),
                       r"numpy scalar whose data does not match its dtype \|V2147483647"),
        "pkl-forged-dtype-size": (pickle2(op_call(f"{NP}.scalar", np_dtype("V8", elsize=4 * GiB), op_bytes(b"x"))),
                                  r"numpy dtype whose stored flags or size differ from its type"),
        "pkl-frombuffer": (pickle2(op_call("numpy._core.numeric._frombuffer", op_bytes(x), np_dtype("f8"),
                                           op_tuple(op_int(big)), op_str("C"))),
                           r"numpy buffer whose size does not match"),
        "pkl-bytes8": (b"\x80\x04\x8e" + (4 * GiB).to_bytes(8, "little") + b"x.",
                       r"truncated or corrupt .*4294967296"),
        "pkl-memo-index": (b"\x80\x02N" + b"r" + (1 << 28).to_bytes(4, "little") + b".",
                           r"declares memo slot 268435456 after only 3 opcodes"),
        "pkl-hex-codec": (pickle2(_hex_chain(40)),
                          r"_codecs.encode with something other than a text encoding"),
    }
    files = {}
    for name, (data, message) in cases.items():
        files[name] = (d / f"{name}.pkl", message)
        files[name][0].write_bytes(data)
    pth = {
        "pth-numpy-1tb": (op_dict(w=op_call(f"{NP}._reconstruct", op_global("numpy.ndarray"),
                                            op_tuple(op_int(1 << 37)), op_bytes(b"b"))),
                          r"declares a numpy array \(137438953472,\)"),
        "pth-numpy-state": (op_dict(w=np_array((big,), np_dtype("f8"), op_bytes(x))),
                            r"declares a numpy array \(536870912,\) of float64"),
        "pth-bytearray": (op_dict(w=op_call("builtins.bytearray", op_int(4 * GiB))),
                          r"asks builtins.bytearray for 4294967296 bytes"),
        "pth-tensor-class": (op_dict(w=op_call("torch.FloatTensor", op_int(1 << 30))),
                             r"asks torch.FloatTensor for 8589934592 bytes"),
        "pth-hex-codec": (op_dict(w=_hex_chain(40)), r"_codecs.encode with something other than a text encoding"),
        "pth-storage-numel": (op_dict(w=tensor_from(storage_pid(1 << 30))),
                              r"declares a tensor storage of 4294967296 bytes where the file holds 16"),
    }
    for name, (body, message) in pth.items():
        files[name] = (torch_zip(d / f"{name}.pth", pickle2(body)), message)
    files["pth-legacy-storage"] = (torch_legacy(d / "legacy.pth", pickle2(op_dict(w=tensor_from(
        storage_pid(1 << 30, legacy=True))))), r"declares tensor storages of 4294967296 bytes, more than")
    return files


def _hex_chain(levels: int) -> bytes:
    """_codecs.encode(..._codecs.encode(b'A', 'hex')..., 'hex'): doubles at each level (2**40 bytes)."""
    out = op_bytes(b"A")
    for _ in range(levels):
        out = op_call("_codecs.encode", out, op_str("hex"))
    return out


# the last two crash today's loader (numpy reads past a list, or follows forged pointers): run last
HOSTILE = ["pkl-array-shape", "pkl-reconstruct-shape", "pkl-object-array", "pkl-scalar", "pkl-forged-dtype-size",
           "pkl-frombuffer", "pkl-bytes8", "pkl-memo-index", "pkl-hex-codec", "pth-numpy-1tb", "pth-numpy-state",
           "pth-bytearray", "pth-tensor-class", "pth-hex-codec", "pth-storage-numel", "pth-legacy-storage",
           "pkl-short-object-list", "pkl-forged-object-dtype"]


LOADER = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from transfer.safe_load import read_checkpoint

def status(field):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(field + ":"))) * 1024

for warm in sys.argv[1:3]:   # legitimate files first: whatever torch/numpy set up lazily is set up
    read_checkpoint(warm)
limit = status("VmSize") + (768 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
for path in sys.argv[3:]:
    before = status("VmPeak")
    try:
        result = "loaded: " + repr(read_checkpoint(path))[:300]
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    print(json.dumps({"path": path, "result": result, "grew": status("VmPeak") - before}), flush=True)
"""


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory) -> dict:
    """Load every hostile file in one child process whose address space is capped at 768 MiB above
    its start: what it could not allocate, it did not; a crash (numpy reading forged pointers)
    leaves the remaining cases without a result."""
    d = tmp_path_factory.mktemp("hostile")
    files = hostile_files(d)
    torch.save({"w": torch.arange(4.0), "a": np.arange(3)}, d / "ok.pth")
    (d / "ok.pkl").write_bytes(pickle.dumps({"a": np.arange(3.0), "s": np.float32(1)}, 2))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LOADER, str(d / "ok.pth"), str(d / "ok.pkl"),
                           *(str(files[case][0]) for case in HOSTILE)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_path = {line["path"]: line for line in lines}
    return {name: (by_path.get(str(p)), message, proc.returncode, proc.stderr[-2000:])
            for name, (p, message) in files.items()}



@pytest.mark.timeout(150)
@pytest.mark.parametrize("case", HOSTILE)
def test_declared_sizes_are_checked_before_allocating(case, hostile_results):
    result, message, returncode, stderr = hostile_results[case]
    assert result is not None, f"the loader died before this case (exit {returncode}): {stderr}"
    text = result["result"]
    assert text.startswith("CheckpointError: ") and "\n" not in text, text
    assert "MemoryError" not in text and "can't allocate" not in text, text
    assert re.search(message, text), text
    assert result["grew"] < 256 << 20, f"address space grew by {result['grew'] >> 20} MiB"


def test_legitimate_numpy_and_torch_values_still_load(tmp_path):
    """The checks refuse declarations, not data: arrays, scalars, object arrays and strings of every
    pickle protocol, torch zip and legacy files, round-trip equal."""
    from transfer.safe_load import read_checkpoint

    values = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "f": np.asfortranarray(np.ones((2, 3))),
              "s": np.float64(0.5), "i": np.int64(7), "o": np.array([1, "x", None], dtype=object),
              "u": np.array(["ab", "c"]), "e": np.zeros((0, 3)), "b": np.array([True, False])}
    for proto in (2, 4, 5):
        (tmp_path / f"v{proto}.pkl").write_bytes(pickle.dumps(values, protocol=proto))
        got = read_checkpoint(tmp_path / f"v{proto}.pkl")
        for k, v in values.items():
            assert isinstance(got[k], np.ndarray) or type(got[k]) is type(v), (proto, k)
            assert np.array_equal(np.asarray(got[k]), v) and np.asarray(got[k]).dtype == v.dtype, (proto, k)
    for legacy in (False, True):
        path = tmp_path / f"t{legacy}.pth"
        torch.save({"w": torch.arange(6.0).view(2, 3)[:, 1:], "n": values["a"], "s": values["s"]}, path,
                   _use_new_zipfile_serialization=not legacy)
        got = read_checkpoint(path)
        assert torch.equal(got["w"], torch.arange(6.0).view(2, 3)[:, 1:]) and np.array_equal(got["n"], values["a"])
        assert pickle.loads(pickle.dumps(got["n"])).__class__ is np.ndarray   # no stand-in class leaks out


# ---- 4. what sits where a tensor belongs ------------------------------------------------------------

@pytest.mark.parametrize("name, value, message", [
    ("layer2.0.conv1.weight", "meta", r"'layer2\.0\.conv1\.weight' is a meta tensor \(a shape without data\)"),
    ("layer1.0.conv2.weight", "a string", r"entries that are not tensors: layer1\.0\.conv2\.weight"),
    ("layer1.0.conv2.weight", [1, 2], r"entries that are not tensors: layer1\.0\.conv2\.weight"),
    ("conv1.weight", np.array(["a", "b"]), r"'conv1\.weight' is a numpy array of <U1, not a tensor"),
    ("conv1.weight", "sparse", r"'conv1\.weight' is a torch\.sparse_coo tensor"),
])
def test_non_weights_in_backbone_slots_give_one_line(name, value, message, tmp_path, capsys):
    sd = resnet18_like()
    shape = sd[name].shape
    if isinstance(value, str) and value == "meta":
        value = torch.empty(shape, device="meta")
    elif isinstance(value, str) and value == "sparse":
        value = torch.zeros(shape).to_sparse()
    sd[name] = value
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=message):
        inspect_checkpoint(tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=message):
        load_backbone(tmp_path / "m.pth")
    one_line_cli_error(capsys, "inspect", str(tmp_path / "m.pth"))


# ---- 5. NaN / Inf -----------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_non_finite_weights_are_refused(suffix, tmp_path, capsys):
    from transfer.convert import save_detectron2

    sd = resnet18_like()
    sd["conv1.weight"] = torch.full(sd["conv1.weight"].shape, float("inf"))
    var = sd["layer3.1.bn2.running_var"].clone()
    var[5] = float("nan")
    sd["layer3.1.bn2.running_var"] = var
    path = tmp_path / f"m{suffix}"
    torch.save(sd, path) if suffix == ".pth" else save_detectron2(sd, path)
    with pytest.raises(CheckpointError, match=r"2 backbone tensors hold NaN or Inf values \(first: "
                                              r"conv1\.weight, layer3\.1\.bn2\.running_var\)"):
        load_backbone(path)
    report = inspect_checkpoint(path)
    assert not report.ok and report.non_finite == ["conv1.weight", "layer3.1.bn2.running_var"]
    assert cgh_main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "NON-FINITE   conv1.weight" in out and "NOT LOADABLE" in out and "NaN/Inf" in out
    assert cgh_main(["inspect", "--json", str(path)]) == 1
    assert json.loads(capsys.readouterr().out)["non_finite"] == report.non_finite
    sd["conv1.weight"] = resnet18_like()["conv1.weight"]
    sd["layer3.1.bn2.running_var"] = resnet18_like()["layer3.1.bn2.running_var"]
    torch.save(sd, tmp_path / "fine.pth")
    assert inspect_checkpoint(tmp_path / "fine.pth").ok   # control: the same file, finite, loads


# ---- 6. the canonical pair ---------------------------------------------------------------------------

def test_a_torn_canonical_pair_is_refused(tmp_path, monkeypatch, capsys):
    """A kill between the .safetensors rename and the sidecar write: new tensors, old sidecar."""
    import cgh.canonical
    import transfer.hub

    path = save_canonical(resnet18_like(0.5), tmp_path / "bb.safetensors", method="cgh", epoch=3)
    calls = []
    for module in (cgh.canonical, transfer.hub):
        real = module.sha256_file
        monkeypatch.setattr(module, "sha256_file", lambda p, _real=real: calls.append(p) or _real(p))
    assert load_backbone(path).epoch == 3
    assert len(calls) == 1   # the hub hashes the file once and hands the hash to the sidecar check
    newer = save_canonical(resnet18_like(0.25), tmp_path / "new" / "bb.safetensors", method="x", epoch=9)
    os.replace(newer, path)
    message = (r"sidecar .*bb\.json describes another tensor file \(sha256 [0-9a-f]{16}\.\.\. vs "
               r"[0-9a-f]{16}\.\.\.\): the pair is inconsistent, re-export or delete the sidecar")
    with pytest.raises(CheckpointError, match=message):
        load_backbone(path)
    with pytest.raises(CheckpointError, match=message):
        inspect_checkpoint(path)
    with pytest.raises(CghError, match=message):
        load_canonical(path)
    assert "describes another tensor file" in one_line_cli_error(capsys, "inspect", str(path))


@pytest.mark.parametrize("sidecar, message", [
    ("not-an-object", r"sidecar .* is a JSON list, not an object"),
    ("huge", r"bb\.json: \d+ bytes, more than the 1048576 allowed"),
    ("deep-train-config", r"sidecar .* is nested deeper than 16 levels"),
    ("method-int", r"sidecar .*: 'method' is a int"),
    ("layers-int", r"sidecar .* field 'layers' is a int, not a list of stage names"),
])
def test_sidecars_are_bounded_inert_data(sidecar, message, tmp_path, capsys):
    path = save_canonical(resnet18_like(), tmp_path / "bb.safetensors", method="cgh", epoch=3,
                          train_config={"layers": ["layer4"]})
    side = sidecar_path(path)
    meta = json.loads(side.read_text())
    if sidecar == "not-an-object":
        side.write_text(json.dumps([meta]))
    else:
        if sidecar == "huge":
            meta["extra"] = "x" * (2 << 20)
        elif sidecar == "deep-train-config":
            deep: dict = {}
            for _ in range(40):
                deep = {"d": deep}
            meta["train_config"] = deep
        elif sidecar == "method-int":
            meta["method"] = 5
        else:
            meta["train_config"]["layers"] = 3
        side.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_backbone(path)
    one_line_cli_error(capsys, "inspect", str(path))


# ---- the rest of the reader: bounded walks, a report a key cannot forge ------------------------------

@pytest.mark.timeout(60)
def test_a_shared_dict_maze_does_not_hang_the_backbone_search(tmp_path):
    """No known layout, so the prefix search walks the file: 200 keys per level all naming one dict."""
    level: dict = {"x": torch.zeros(1)}
    for _ in range(6):
        level = {f"k{i}": level for i in range(200)}
    torch.save({"blob": level}, tmp_path / "maze.pth")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="no ResNet backbone found"):
        load_backbone(tmp_path / "maze.pth")
    assert time.monotonic() - start < 20


def test_a_key_cannot_forge_a_line_of_the_inspect_report(tmp_path, capsys):
    sd = resnet18_like()
    del sd["layer4.1.bn2.bias"]
    sd["x\nOK: every backbone tensor is present with the right shape\x1b[2K"] = torch.zeros(1)
    torch.save(sd, tmp_path / "m.pth")
    assert cgh_main(["inspect", str(tmp_path / "m.pth")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if line.startswith("OK")] and "\x1b" not in "".join(lines)
    assert lines[-1].startswith("NOT LOADABLE")
