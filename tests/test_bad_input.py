"""Bad input, end to end through the CLI: one line naming the file or tensor and what is wrong, a non-zero exit,
the inputs' bytes untouched, and nothing in --out that looks complete (no index, model.safetensors or manifest).

The damaged-header cases here are the ones tests/test_cli_errors.py does not run end to end (it has truncated
shards, config mismatch, bad α, missing tensors/paths, --out misuse); tests/test_stfile.py / test_index.py check
the same parsers one function at a time. Also here: NaN/Inf warnings (the merge goes on), and an output disk that
is full from the start, that fills up mid-merge, or that is read-only (a real tmpfs; skipped where mount is not
permitted).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

import faulthooks
import pytest
import torch

from expo_dist.cli import main
from expo_dist.formats.safetensors import read_header

REPO = pathlib.Path(__file__).resolve().parents[1]
COMPLETE = ("model.safetensors.index.json", "model.safetensors", "expo_manifest.json")




@pytest.fixture(scope="module")
def sharded(pair_factory):
    """Small bf16 pair, both sharded (differently)."""
    return pair_factory("sharded", seed=1)


@pytest.fixture
def pair(pair_factory):
    """A private copy of `sharded` to damage."""
    return pair_factory("sharded", seed=1, private=True)


def digest(*folders) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(pathlib.Path(folder).rglob("*")) if p.is_file()}


def shards(folder):
    return sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors"))


def multi(folder):
    """A shard holding several tensors."""
    return max(shards(folder), key=lambda p: len(read_header(str(p)).tensors))


def cli(*args, env=None, timeout=120):
    env = {k: v for k, v in (env or os.environ).items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "expo_dist.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def nothing_complete(out):
    if out.exists():
        names = os.listdir(out)
        assert not [n for n in names if n in COMPLETE or n.endswith(".safetensors")], names


def refused(pair, out, *words, code=2, alpha="0.3"):
    """Run the merge, expect a refusal: exit code, one stderr line holding words, nothing complete, inputs intact."""
    before = digest(*pair)
    r = cli("merge", "--sft", pair[0], "--aligned", pair[1], f"--alpha={alpha}", "--out", out, "-q")
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("expo-dist: error: "), r.stderr
    for w in words:
        assert str(w) in lines[0], f"{w!r} not in {lines[0]!r}"
    assert r.stdout == ""
    nothing_complete(out)
    assert digest(*pair) == before
    return lines[0]


def edit_header(path: pathlib.Path, change, extra: bytes = b"", raw_json=None):
    """Rewrite a safetensors file's header with change(doc); the data section is kept (plus extra bytes)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    doc = json.loads(data[8:8 + n])
    change(doc)
    head = raw_json if raw_json is not None else json.dumps(doc).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + data[8 + n:] + extra)


def last_tensor(doc):
    return max((k for k in doc if k != "__metadata__"), key=lambda k: doc[k]["data_offsets"][0])


def shift(doc, name, by):
    lo, hi = doc[name]["data_offsets"]
    doc[name]["data_offsets"] = [lo + by, hi + by]


# ---- damaged weight files and indexes --------------------------------------------------------------------------

def test_header_length_beyond_the_file(pair, tmp_path):
    victim = shards(pair[0])[1]
    with open(victim, "r+b") as f:
        f.write((victim.stat().st_size * 2).to_bytes(8, "little"))
    refused(pair, tmp_path / "out", victim, "header length", "goes beyond the file")


def test_header_not_json(pair, tmp_path):
    victim = shards(pair[1])[0]
    data = bytearray(victim.read_bytes())
    data[8] = ord("!")
    victim.write_bytes(bytes(data))
    refused(pair, tmp_path / "out", victim, "header is not valid JSON")


def test_overlapping_offsets(pair, tmp_path):
    victim = multi(pair[0])
    name = None

    def change(doc):
        nonlocal name
        name = last_tensor(doc)
        shift(doc, name, -2)  # now it starts inside the tensor before it

    edit_header(victim, change, extra=b"")
    refused(pair, tmp_path / "out", victim, repr(name), "overlaps")


def test_hole_between_tensors(pair, tmp_path):
    victim = multi(pair[1])
    name = None

    def change(doc):
        nonlocal name
        name = last_tensor(doc)
        shift(doc, name, 8)

    edit_header(victim, change, extra=b"\0" * 8)
    refused(pair, tmp_path / "out", victim, "hole of 8 bytes", repr(name))


def test_offsets_out_of_the_file(pair, tmp_path):
    victim = multi(pair[1])

    def change(doc):  # the last tensor grows by a row (shape and offsets agree), past the end of the file
        t = doc[last_tensor(doc)]
        row = (t["data_offsets"][1] - t["data_offsets"][0]) // t["shape"][0]
        t["shape"][0] += 1
        t["data_offsets"][1] += row

    edit_header(victim, change)
    refused(pair, tmp_path / "out", victim, "truncated", "header says")


def test_unknown_dtype(pair, tmp_path):
    victim = shards(pair[0])[2]
    name = None

    def change(doc):
        nonlocal name
        name = last_tensor(doc)
        doc[name]["dtype"] = "BF17"

    edit_header(victim, change)
    refused(pair, tmp_path / "out", victim, repr(name), "unknown dtype 'BF17'")


def test_shape_times_dtype_is_not_the_byte_length(pair, tmp_path):
    victim = shards(pair[1])[0]
    name = None

    def change(doc):
        nonlocal name
        name = last_tensor(doc)
        doc[name]["shape"] = [doc[name]["shape"][0] + 1] + doc[name]["shape"][1:]

    edit_header(victim, change)
    refused(pair, tmp_path / "out", victim, repr(name), "needs", "data_offsets span")


def test_duplicate_tensor_across_shards(pair, tmp_path):
    first, second = shards(pair[1])[:2]
    taken = next(k for k in json.loads(first.read_bytes()[8:8 + int.from_bytes(first.read_bytes()[:8], "little")])
                 if k != "__metadata__")

    def change(doc):  # rename a tensor of the second shard to one the first shard holds
        name = last_tensor(doc)
        doc[taken] = doc.pop(name)

    edit_header(second, change)
    refused(pair, tmp_path / "out", repr(taken), "appears in both", first.name, second.name)


def test_index_names_a_missing_file(pair, tmp_path):
    path = pair[0] / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    path.write_text(json.dumps(index))
    refused(pair, tmp_path / "out", path, "model-00009-of-00009.safetensors", "missing")


@pytest.mark.parametrize("bad", ["../sft/model-00001-of-00003.safetensors", "sub/model.safetensors",
                                 "/etc/hostname", ".."], ids=["dotdot", "slash", "absolute", "bare-dotdot"])
def test_index_with_unsafe_file_name(pair, tmp_path, bad):
    path = pair[1] / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.norm.weight"] = bad
    path.write_text(json.dumps(index))
    refused(pair, tmp_path / "out", path, repr(bad), "plain file name")


def test_damaged_sft_shard_keeps_a_resumable_out_untouched(pair, sharded, tmp_path):
    """A bad input found on a rerun leaves an unfinished merge's folder as it was."""
    out = tmp_path / "out"
    (out / ".expo").mkdir(parents=True)
    (out / ".expo" / "plan.json").write_text('{"fingerprint": "x"}')
    victim = shards(pair[0])[0]
    os.truncate(victim, victim.stat().st_size - 3)
    before = digest(out)
    refused(pair, out, victim, "truncated")
    assert digest(out) == before


@pytest.mark.parametrize("alpha", ["-inf", "1e999"])
def test_alpha_not_finite(pair, tmp_path, alpha):
    refused(pair, tmp_path / "out", "--alpha must be a finite number", alpha=alpha)


def test_other_architecture(pair, tmp_path):
    cfg = json.loads((pair[0] / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (pair[0] / "config.json").write_text(json.dumps(cfg))
    refused(pair, tmp_path / "out", "config.json differs in model_type", "'mistral'", "'llama'")


# ---- NaN / Inf: warnings, the merge goes on ------------------------------------------------------------------

def poke(folder: pathlib.Path, name: str, element: int, value: float, dtype):
    index = folder / "model.safetensors.index.json"
    fname = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    path = folder / fname
    entry = read_header(str(path)).tensors[name]
    raw = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
    with open(path, "r+b") as f:
        f.seek(entry.begin + element * len(raw))
        f.write(raw)


def merge_in_process(pair, out, alpha, capsys, *extra):
    rc = main(["merge", "--sft", str(pair[0]), "--aligned", str(pair[1]), "--alpha", str(alpha), "--out", str(out),
               "-q", *extra])
    return rc, capsys.readouterr()


def test_overflow_where_inputs_are_finite_warns(local_ray, pair_factory, tmp_path, capsys, caplog):
    sft, aligned = pair_factory(dtype="float16", seed=4, private=True)
    name = "model.layers.0.mlp.down_proj.weight"
    poke(aligned, name, 10, 60000.0, torch.float16)  # finite in f16 (max 65504) ...
    poke(sft, name, 10, -60000.0, torch.float16)  # ... but 60000 + 0.5 * 120000 is not
    out = tmp_path / "out"
    rc, _ = merge_in_process((sft, aligned), out, 0.5, capsys)
    assert rc == 0
    assert "1 output elements are NaN or Inf where the inputs had none" in caplog.text
    man = json.loads((out / "expo_manifest.json").read_text())
    assert (man["nonfinite_out"], man["nonfinite_in"]) == (1, 0)
    assert main(["verify", str(out), "--sft", str(sft), "--aligned", str(aligned), "--full"]) == 0
    assert "NaN/Inf: 0 in the inputs, 1 in the output" in capsys.readouterr().out


def test_nan_and_inf_in_the_inputs_are_counted(local_ray, pair_factory, tmp_path, capsys, caplog):
    sft, aligned = pair_factory(dtype="bfloat16", seed=5, private=True)
    name = "model.layers.1.self_attn.q_proj.weight"
    poke(aligned, name, 3, float("nan"), torch.bfloat16)
    poke(sft, name, 7, float("inf"), torch.bfloat16)
    poke(sft, "model.norm.weight", 0, float("-inf"), torch.bfloat16)
    out = tmp_path / "out"
    rc, _ = merge_in_process((sft, aligned), out, 0.3, capsys)
    assert rc == 0
    assert "the inputs hold 3 NaN or Inf elements; 3 output elements are NaN or Inf" in caplog.text
    man = json.loads((out / "expo_manifest.json").read_text())
    assert (man["nonfinite_in"], man["nonfinite_out"]) == (3, 3)
    assert main(["verify", str(out), "--sft", str(sft), "--aligned", str(aligned), "--full"]) == 0
    assert "NaN/Inf: 3 in the inputs, 3 in the output" in capsys.readouterr().out


# ---- the output disk: full, filling up, read-only --------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size; unmounted at the end. Skips where mounting is not permitted."""
    mounts = []

    def mount(size: str, name: str = "disk") -> pathlib.Path:
        where = tmp_path / name
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root / CAP_SYS_ADMIN")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        for _ in range(50):  # a worker that just exited may still hold a file open for a moment
            if subprocess.run(["umount", str(where)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: pathlib.Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(where)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def mid(pair_factory):
    """~8 MB per model, 1 MiB tasks: enough tasks to fill a disk in the middle of."""
    return pair_factory("small", seed=6)


MID_ARGS = ["--alpha", "0.3", "--max-task-bytes", "1MiB", "--max-shard-size", "3MB", "--workers", "2"]


@pytest.fixture(scope="module")
def mid_reference(local_ray, mid, tmp_path_factory):
    out = tmp_path_factory.mktemp("midref") / "out"
    assert main(["merge", "--sft", str(mid[0]), "--aligned", str(mid[1]), "--out", str(out), "-q", *MID_ARGS]) == 0
    return out


def assert_same(out, ref):
    names = sorted(f for f in os.listdir(ref) if f.endswith((".safetensors", ".index.json")))
    assert sorted(f for f in os.listdir(out) if f.endswith((".safetensors", ".index.json"))) == names
    for f in names:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f


def test_disk_too_small_then_room(local_ray, mid, mid_reference, tmpfs, capsys):
    disk = tmpfs("4m")
    out = disk / "out"
    argv = ["merge", "--sft", str(mid[0]), "--aligned", str(mid[1]), "--out", str(out), "-q", *MID_ARGS]
    before = digest(*mid)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"expo-dist: error: {out}: no space left on the output disk"), err
    assert "free space or choose another --out" in err[0]
    nothing_complete(out)
    remount(disk, "size=64m")  # room now: the same command resumes and finishes
    assert main(argv) == 0
    assert_same(out, mid_reference)
    assert digest(*mid) == before


def test_disk_fills_up_mid_merge_then_resumes(local_ray, mid, mid_reference, tmpfs, capsys):
    disk = tmpfs("24m")
    out = disk / "out"
    argv = ["merge", "--sft", str(mid[0]), "--aligned", str(mid[1]), "--out", str(out), "-q", *MID_ARGS]
    env = dict(os.environ, **faulthooks.env(delay=0.3))  # test-only: slow tasks, so the disk fills mid-merge
    p = subprocess.Popen([sys.executable, "-m", "expo_dist.cli", *argv], cwd=REPO, text=True,
                         env={k: v for k, v in env.items() if k != "RAY_ADDRESS"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = out / ".expo" / "journal.jsonl"
    t0 = time.monotonic()
    while not (journal.exists() and len(journal.read_text().splitlines()) >= 2):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < 120
        time.sleep(0.05)
    junk = disk / "junk"
    with open(junk, "wb") as f:  # another job fills the disk
        try:
            while True:
                f.write(b"\1" * (1 << 20))
                f.flush()
        except OSError:
            pass
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("expo-dist: error: ") and "no space left on the output disk" in last, stderr
    assert "Traceback" not in stderr and stdout == ""
    nothing_complete(out)
    done = len(journal.read_text().splitlines())
    junk.unlink()
    assert main(argv + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks_resumed"] >= min(done, 2)
    assert_same(out, mid_reference)


def test_read_only_disk(mid, tmpfs):
    disk = tmpfs("64m")
    (disk / "empty").mkdir()
    remount(disk, "ro")
    before = digest(*mid)
    for out in (disk / "new", disk / "empty"):
        r = cli("merge", "--sft", mid[0], "--aligned", mid[1], "--out", out, "-q", *MID_ARGS)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "not writable (Read-only file system)" in lines[0], r.stderr
        assert str(disk) in lines[0]
        nothing_complete(out)
    assert os.listdir(disk / "empty") == []
    assert digest(*mid) == before
