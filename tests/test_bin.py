"""PyTorch .bin checkpoints: indexed from the zip directory and a restricted unpickle (no pickle code ever runs),
merged exactly alone or mixed with safetensors; malicious and unreadable files are refused with one clear line."""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections import OrderedDict

import pytest
import torch

from expo_dist.errors import ExpoError
from expo_dist.formats.torchzip import read_bin_file
from expo_dist.merge import run
from expo_dist.sources.index import index_model
from expo_dist.spec import MergeSpec
from expo_dist.testing.reference import assert_exact

ALPHA = 0.3
ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
            torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}


def raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def check_index_against_torch(path, sd):
    """Every entry's byte range in the file holds exactly the tensor's bytes; dtype and shape agree."""
    h = read_bin_file(str(path))
    assert set(h.tensors) == set(sd)
    data = pathlib.Path(path).read_bytes()
    for name, t in sd.items():
        e = h.tensors[name]
        assert e.dtype == ST_DTYPE[t.dtype] and e.shape == tuple(t.shape), name
        assert data[e.begin:e.end] == raw_bytes(t), name
    # and torch itself (weights_only) agrees on the values
    loaded = torch.load(str(path), weights_only=True, mmap=True, map_location="cpu")
    for name, t in loaded.items():
        assert raw_bytes(t) == raw_bytes(sd[name]), name
    return h


def test_every_dtype_views_parameters_scalars(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = OrderedDict()
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        sd[f"f.{dt}"] = torch.randn(5, 3, generator=g).to(dt)
    for dt in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32):
        sd[f"i.{dt}"] = torch.randint(0, 100, (7,), generator=g, dtype=torch.int64).to(dt)
    sd["bool"] = torch.tensor([True, False, True])
    base = torch.randn(40, generator=g)
    sd["view.a"] = base[3:13].view(2, 5)  # a contiguous run inside a larger storage
    sd["view.b"] = base[10:30]  # overlaps view.a: same storage
    sd["param"] = torch.nn.Parameter(torch.randn(4, 2, generator=g))
    sd["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    sd["empty"] = torch.zeros(0, 8)
    sd["unit.dims"] = torch.randn(3, 1, 4, generator=g)[:, :, :]
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    h = check_index_against_torch(path, sd)
    # views share the storage: their ranges overlap exactly where the elements do
    assert h.tensors["view.b"].begin == h.tensors["view.a"].begin + 7 * 4


def test_tied_weights_share_one_range(tmp_path):
    emb = torch.randn(16, 8)
    sd = OrderedDict([("model.embed_tokens.weight", emb), ("lm_head.weight", emb)])  # as a tied HF model saves
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    h = check_index_against_torch(path, sd)
    a, b = h.tensors["model.embed_tokens.weight"], h.tensors["lm_head.weight"]
    assert (a.begin, a.end) == (b.begin, b.end)


def test_large_archive_zip64(tmp_path):
    """Shards over 4 GiB use zip64 records; here many members push the directory into zip64 territory cheaply."""
    sd = OrderedDict((f"t{i}", torch.full((3,), float(i))) for i in range(70_000))
    path = tmp_path / "many.bin"
    torch.save(sd, path)
    h = read_bin_file(str(path))
    data = path.read_bytes()
    for i in (0, 1, 65_535, 65_536, 69_999):
        e = h.tensors[f"t{i}"]
        assert data[e.begin:e.end] == raw_bytes(sd[f"t{i}"])


# ---- refusals ----


def expect_error(path, *words):
    with pytest.raises(ExpoError) as ei:
        read_bin_file(str(path))
    msg = str(ei.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_non_contiguous_refused(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(3, 4).t()}, p)
    expect_error(p, str(p), "'w'", "non-contiguous", "stride")


def test_legacy_format_refused(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(3)}, p, _use_new_zipfile_serialization=False)
    expect_error(p, str(p), "legacy", "torch < 1.6")


def test_compressed_member_refused(tmp_path):
    src, p = tmp_path / "src.bin", tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1000)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for zi in zin.infolist():
            zout.writestr(zi.filename, zin.read(zi))
    expect_error(p, str(p), "compressed")


def test_truncated_and_garbage_refused(tmp_path):
    src = tmp_path / "src.bin"
    torch.save({"w": torch.zeros(1000)}, src)
    data = src.read_bytes()
    p = tmp_path / "cut.bin"
    p.write_bytes(data[: len(data) // 2])
    expect_error(p, str(p))
    p2 = tmp_path / "garbage.bin"
    p2.write_bytes(b"hello, not a checkpoint" * 10)
    expect_error(p2, str(p2), "not a torch.save zip archive")


def test_not_a_state_dict(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    torch.save([torch.zeros(2)], p)
    expect_error(p, str(p), "not a state dict")
    torch.save({"w": torch.zeros(2), "step": 3}, p)
    expect_error(p, str(p), "'step'", "not a tensor")


class _Evil:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilExec:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _EvilTensor:
    """Pickles as torch._utils._rebuild_tensor_v2(<os.system(...)>, 0, (4,), (1,), False, OrderedDict())."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import torch._utils

        return (torch._utils._rebuild_tensor_v2, (_Evil(self.marker), 0, (4,), (1,), False, OrderedDict()))


def malicious_bin(path: pathlib.Path, payload: bytes) -> None:
    """A torch.save-shaped zip (prefix/data.pkl, prefix/data/0, prefix/version) whose data.pkl is payload."""
    good = path.parent / "good.bin"
    torch.save({"w": torch.zeros(4)}, good)
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zout:
        for zi in zin.infolist():
            zout.writestr(zi, payload if zi.filename.endswith("data.pkl") else zin.read(zi))
    good.unlink()


def payloads(marker):
    evil = _Evil(marker)
    return {
        "os.system-in-dict-p2": pickle.dumps(OrderedDict(w=evil), protocol=2),
        "os.system-top-p4": pickle.dumps(evil, protocol=4),  # STACK_GLOBAL
        "exec-p0": pickle.dumps({"w": _EvilExec(marker)}, protocol=0),  # text protocol: GLOBAL/REDUCE
        # the evil call hidden as the storage argument of an allowed rebuild function
        "inside-rebuild": pickle.dumps(OrderedDict(w=_EvilTensor(marker)), protocol=2),
    }


@pytest.mark.parametrize("kind", ["os.system-in-dict-p2", "os.system-top-p4", "exec-p0", "inside-rebuild"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "PWNED"
    payload = payloads(marker)[kind]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    p = folder / "pytorch_model.bin"
    malicious_bin(p, payload)
    msg = expect_error(p, str(p), "refused", "nothing in it was run")
    assert "system" in msg or "exec" in msg
    assert not marker.exists()
    with pytest.raises(ExpoError):
        index_model(str(folder))
    assert not marker.exists()
    # the CLI's plan refuses it the same way: exit code 2, one line naming the file
    r = subprocess.run([sys.executable, "-m", "expo_dist.cli", "plan", "--sft", str(folder), "--aligned", str(folder),
                        "--alpha", "0.3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("expo-dist: error:")]
    assert len(err) == 1 and str(p) in err[0] and "refused" in err[0], r.stderr
    assert not marker.exists()
    # the payload is live: an unrestricted unpickle (what torch.load(weights_only=False) does) runs it
    code = ("import pickle, sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); "
            "n = [x for x in z.namelist() if x.endswith('data.pkl')][0]\n"
            "try:\n    pickle.loads(z.read(n))\nexcept Exception:\n    pass")
    subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, timeout=60)
    assert marker.exists(), "the crafted pickle should run code when unpickled without restrictions"


# ---- merges ----


@pytest.fixture(scope="module")
def pairs(pair_factory):
    sft, aligned = pair_factory("two-shards", seed=7, extra_vocab=5, nonfloat_buffer=True)
    return {"st": (sft, aligned), "bin": (pair_factory.bin(sft, None), pair_factory.bin(aligned, 4))}


def test_bin_index_equals_safetensors_index(pairs):
    for st, b in zip(pairs["st"], pairs["bin"]):
        a, c = index_model(str(st)), index_model(str(b))
        assert c.format == "pytorch .bin" and a.format == "safetensors"
        assert {n: (r.dtype, r.shape) for n, r in a.tensors.items()} == \
               {n: (r.dtype, r.shape) for n, r in c.tensors.items()}
        assert c.config == a.config
        for n, r in c.tensors.items():
            with open(r.file, "rb") as f:
                f.seek(r.entry.begin)
                got = f.read(r.entry.nbytes)
            ra = a.tensors[n]
            with open(ra.file, "rb") as f:
                f.seek(ra.entry.begin)
                assert got == f.read(ra.entry.nbytes), n


@pytest.mark.parametrize("combo", ["bin+bin", "st-sft+bin-aligned", "bin-sft+st-aligned"])
def test_merge_exact(local_ray, pairs, tmp_path, combo):
    st, b = pairs["st"], pairs["bin"]
    sft, aligned = {"bin+bin": (b[0], b[1]), "st-sft+bin-aligned": (st[0], b[1]),
                    "bin-sft+st-aligned": (b[0], st[1])}[combo]
    out = tmp_path / "out"
    manifest = run(MergeSpec(sft=str(sft), aligned=str(aligned), alpha=ALPHA, out=str(out),
                             max_shard_size="200KB", max_task_bytes="1MiB"), progress=False)
    # compared with the float64 reference computed from the safetensors originals
    assert_exact(str(out), str(st[0]), str(st[1]), ALPHA, tie=False)
    files = sorted(os.listdir(out))
    assert not any(f.endswith(".bin") for f in files) and "model.safetensors.index.json" in files
    assert all(f.endswith(".safetensors") for f in manifest["files"])
    assert manifest["tensors"]["model.extra_buffer.position_ids"]["op"] == "copy"
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (aligned / name).read_bytes()
    assert "pytorch_model.bin.index.json" not in files


# ---- one file cannot change how another is read (BUILD poisoning) ----


def _str(text: str) -> bytes:
    b = text.encode()
    return b"X" + len(b).to_bytes(4, "little") + b  # BINUNICODE


def _glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _slot_build(attr: str, value: bytes) -> bytes:
    """BUILD with (None, {attr: value}): setattr on the object below, slots included; then POP it."""
    return b"N}" + _str(attr) + value + b"s\x86b0"


# each a prefix put after the PROTO opcode of a legitimate data.pkl: it mutates a whitelisted object, then the
# legitimate state dict follows. Before the fix, the mutation outlived the file and changed how the next was read.
POISONS = {
    "storage-type": _glob("torch", "BFloat16Storage") + _slot_build("dtype", _str("U8"))
                    + _glob("torch", "FloatStorage") + _slot_build("dtype", _str("U8")),
    "dtype": _glob("torch", "bfloat16") + _slot_build("dtype", _str("U8")),
    "rebuild-function": _glob("torch._utils", "_rebuild_tensor_v2") + _slot_build("__defaults__", b")"),
    "tensor-class": _glob("torch._tensor", "Tensor") + _slot_build("name", _str("x")),
    "parameter-class": _glob("torch.nn.parameter", "Parameter") + _slot_build("name", _str("x")),
    "dict-state-on-storage-type": _glob("torch", "FloatStorage") + b"}" + _str("dtype") + _str("U8") + b"sb0",
}


def storage_record_poison() -> bytes:
    """A whole data.pkl: a legitimate F32 tensor whose storage record is changed by BUILD after it was checked."""
    pid = b"(" + _str("storage") + _glob("torch", "FloatStorage") + _str("0") + _str("cpu") + b"K\x04tQ"
    tensor = (_glob("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + b"q\x01K\x00K\x04\x85K\x01\x85\x89"
              + _glob("collections", "OrderedDict") + b")RtR")
    return (b"\x80\x02" + _glob("collections", "OrderedDict") + b")R(" + _str("w") + tensor + b"u"
            + b"h\x01}(" + _str("dtype") + _str("U8") + _str("numel") + b"K\x10ub0.")


def rewrite_pickle(src: pathlib.Path, dst: pathlib.Path, fn) -> None:
    """Copy a torch.save zip with its data.pkl replaced by fn(data.pkl)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for zi in zin.infolist():
            data = zin.read(zi)
            zout.writestr(zi, fn(data) if zi.filename.endswith("data.pkl") else data)


def index_bytes(folder) -> dict[str, tuple]:
    """tensor -> (dtype, shape, the bytes its range holds): what a reader of the folder would get."""
    idx = index_model(str(folder))
    out = {}
    for n, r in idx.tensors.items():
        with open(r.file, "rb") as f:
            f.seek(r.entry.begin)
            out[n] = (r.dtype, r.shape, f.read(r.entry.nbytes))
    return out


@pytest.mark.parametrize("kind", [*POISONS, "storage-record"])
def test_build_poisoning_is_refused_and_the_other_model_reads_exactly(pairs, tmp_path, kind):
    st_sft, st_al = pairs["st"]
    bin_sft, bin_al = pairs["bin"]
    poisoned = shutil.copytree(bin_sft, tmp_path / "sft", ignore=shutil.ignore_patterns("*.bin"))
    p = poisoned / "pytorch_model.bin"
    if kind == "storage-record":
        rewrite_pickle(bin_sft / "pytorch_model.bin", p, lambda data: storage_record_poison())
    else:
        rewrite_pickle(bin_sft / "pytorch_model.bin", p, lambda data: data[:2] + POISONS[kind] + data[2:])
    msg = expect_error(p, str(p), "refused", "BUILD", "nothing in it was run")
    with pytest.raises(ExpoError, match="BUILD"):
        index_model(str(poisoned))
    # the same legitimate state dict without the prefix still reads; and the aligned .bin read next is exact
    assert index_bytes(bin_al) == index_bytes(st_al)
    assert index_bytes(bin_sft) == index_bytes(st_sft)
    assert "\n" not in msg


def test_each_file_gets_fresh_whitelisted_objects():
    from expo_dist.formats.unpickle import SafeUnpickler

    a, b = SafeUnpickler(io.BytesIO(b"")), SafeUnpickler(io.BytesIO(b""))
    for key, obj in a.allowed.items():
        if key != ("collections", "OrderedDict"):  # a built-in type: nothing can change it
            assert b.allowed[key] is not obj, key


def test_poisoned_sft_then_legitimate_pair_merges_exactly(pairs, tmp_path):
    """The attack of issue 10: a crafted SFT .bin read first, then a legitimate pair; no Ray (the task runner)."""
    from expo_dist.merge import build_plan
    from expo_dist.output.finalize import create_shards
    from expo_dist.runtime.runner import Runner

    st_sft, st_al = pairs["st"]
    bin_sft, bin_al = pairs["bin"]
    poisoned = tmp_path / "poisoned.bin"
    rewrite_pickle(bin_sft / "pytorch_model.bin", poisoned, lambda data: data[:2] + POISONS["storage-type"] + data[2:])
    expect_error(poisoned, "BUILD")
    out = tmp_path / "out"
    out.mkdir()
    spec = MergeSpec(sft=str(bin_sft), aligned=str(bin_al), alpha=ALPHA, out=str(out),
                     max_shard_size="200KB").validate()
    plan, _, _ = build_plan(spec)
    create_shards(plan, str(out))
    runner = Runner(str(out), chunk_bytes=1 << 20)
    for task in plan.tasks:
        runner.run(task)
    runner.close()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": plan.total_size},
                                                                   "weight_map": plan.weight_map()}))
    assert assert_exact(str(out), str(st_sft), str(st_al), ALPHA, tie=False) > 0
