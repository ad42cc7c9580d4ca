"""index_model: every tensor's file, dtype, shape and byte range, from headers alone; refusals of bad folders."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from expo_dist.errors import ExpoError
from expo_dist.sources.index import index_model

ST_NAME = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}


@pytest.fixture(scope="module")
def single(pair_factory):
    return pair_factory(nonfloat_buffer=True, seed=1)


@pytest.fixture(scope="module")
def sharded(pair_factory):
    return pair_factory("sharded", nonfloat_buffer=True, extra_vocab=5, seed=2)


def weight_files(folder: pathlib.Path) -> dict[str, str]:
    """tensor -> file name, as the folder itself says (index, or the single file)."""
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        return json.loads(idx.read_text())["weight_map"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def check_against_safetensors(folder: pathlib.Path):
    idx = index_model(str(folder))
    expected = weight_files(folder)
    assert set(idx.tensors) == set(expected) and len(expected) > 10
    assert idx.root == str(folder.resolve())
    assert {os.path.basename(f) for f in idx.files} == set(expected.values())
    total = 0
    for fname in sorted(set(expected.values())):
        path = folder / fname
        with safe_open(str(path), "pt") as f, open(path, "rb") as raw:
            for name in f.keys():
                ref = idx.tensors[name]
                assert ref.file == str(path.resolve())
                t = f.get_tensor(name)
                assert ref.dtype == ST_NAME[t.dtype] and ref.shape == tuple(t.shape)
                assert ref.entry.nbytes == t.numel() * t.element_size()
                raw.seek(ref.entry.begin)
                data = raw.read(ref.entry.nbytes)
                assert data == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name
                total += ref.entry.nbytes
    assert idx.total_bytes == total
    assert idx.config == json.loads((folder / "config.json").read_text())
    return idx


def test_single_file(single):
    for folder in single:
        idx = check_against_safetensors(folder)
        assert len(idx.files) == 1


def test_sharded(sharded):
    for folder in sharded:
        idx = check_against_safetensors(folder)
        assert len(idx.files) > 3
    # the aligned model really has the extra vocabulary rows
    s, a = (index_model(str(f)) for f in sharded)
    assert a.tensors["model.embed_tokens.weight"].shape[0] == s.tensors["model.embed_tokens.weight"].shape[0] + 5


# ---- refusals ----

def copy_model(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def expect(path, *words):
    with pytest.raises(ExpoError) as ei:
        index_model(str(path))
    msg = str(ei.value)
    for w in words:
        assert str(w) in msg, f"{w!r} not in {msg!r}"
    assert "\n" not in msg
    return msg


def edit_index(folder: pathlib.Path, fn):
    p = folder / "model.safetensors.index.json"
    doc = json.loads(p.read_text())
    fn(doc["weight_map"])
    p.write_text(json.dumps(doc))
    return p


def test_index_names_missing_file(sharded, tmp_path):
    m = copy_model(sharded[1], tmp_path / "m")
    victim = sorted(set(weight_files(m).values()))[2]
    (m / victim).unlink()
    expect(m, "model.safetensors.index.json", victim, "missing")


@pytest.mark.parametrize("bad", ["../model-00001-of-00011.safetensors", "..", "sub/x.safetensors",
                                 "/etc/passwd", "sub\\x.safetensors", ""])
def test_index_refuses_unsafe_file_names(sharded, tmp_path, bad):
    m = copy_model(sharded[1], tmp_path / "m")
    first = next(iter(weight_files(m)))
    p = edit_index(m, lambda wm: wm.__setitem__(first, bad))
    msg = expect(m, str(p), "refuses weight file name")
    assert repr(bad) in msg


def test_index_refuses_absolute_path_to_real_file(sharded, tmp_path):
    m = copy_model(sharded[1], tmp_path / "m")
    wm = weight_files(m)
    name, fname = next(iter(wm.items()))
    p = edit_index(m, lambda w: w.__setitem__(name, str(m / fname)))  # exists, but absolute
    expect(m, str(p), "refuses weight file name")


def test_duplicate_tensor_across_shards(tmp_path):
    m = tmp_path / "dup"
    m.mkdir()
    x = torch.arange(6, dtype=torch.float32)
    save_file({"x": x, "a": torch.ones(2)}, str(m / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({"x": x, "b": torch.ones(3)}, str(m / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "x": "model-00001-of-00002.safetensors", "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors"}}))
    expect(m, "'x'", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "both")


def test_weight_map_points_to_wrong_file(sharded, tmp_path):
    m = copy_model(sharded[1], tmp_path / "m")
    wm = weight_files(m)
    files = sorted(set(wm.values()))
    name = next(n for n, f in wm.items() if f == files[0])
    p = edit_index(m, lambda w: w.__setitem__(name, files[1]))
    expect(m, str(p), repr(name), files[1], "does not hold it")


def test_weight_map_lacks_a_tensor_present_in_a_shard(sharded, tmp_path):
    m = copy_model(sharded[1], tmp_path / "m")
    wm = weight_files(m)
    files = sorted(set(wm.values()))
    # drop one tensor of a file that still holds others (so the file itself stays listed)
    counts = {f: sum(1 for v in wm.values() if v == f) for f in files}
    name = next(n for n, f in wm.items() if counts[f] > 1)
    p = edit_index(m, lambda w: w.pop(name))
    expect(m, str(p), name, "not in weight_map")


def test_weight_map_names_tensor_no_shard_holds(sharded, tmp_path):
    m = copy_model(sharded[1], tmp_path / "m")
    files = sorted(set(weight_files(m).values()))
    p = edit_index(m, lambda w: w.__setitem__("model.ghost.weight", files[0]))
    expect(m, str(p), "'model.ghost.weight'", "does not hold it")


def test_index_not_json(sharded, tmp_path):
    m = copy_model(sharded[1], tmp_path / "m")
    p = m / "model.safetensors.index.json"
    p.write_text("{oops")
    expect(m, str(p), "not a valid safetensors index")


def test_index_without_weight_map(sharded, tmp_path):
    m = copy_model(sharded[1], tmp_path / "m")
    p = m / "model.safetensors.index.json"
    p.write_text(json.dumps({"metadata": {"total_size": 1}}))
    expect(m, str(p), "not a valid safetensors index")


def test_bad_shard_is_named(sharded, tmp_path):
    m = copy_model(sharded[0], tmp_path / "m")
    victim = sorted(set(weight_files(m).values()))[1]
    with open(m / victim, "r+b") as f:
        f.truncate(os.path.getsize(m / victim) - 3)
    expect(m, victim, "truncated")


def test_folder_without_weights(single, tmp_path):
    m = tmp_path / "empty_model"
    m.mkdir()
    shutil.copy(single[0] / "config.json", m / "config.json")
    expect(m, str(m), "no model.safetensors")


def test_not_a_directory(single, tmp_path):
    expect(single[0] / "model.safetensors", "not a directory")
    expect(tmp_path / "does-not-exist", str(tmp_path / "does-not-exist"), "not a directory")


def test_bad_config(single, tmp_path):
    m = copy_model(single[0], tmp_path / "m")
    (m / "config.json").write_text("[1, 2]")
    expect(m, "config.json", "not a JSON object")
    (m / "config.json").write_text("{nope")
    expect(m, "config.json", "cannot read config")
