"""`expo-dist merge` refusals: one clear line on stderr, a non-zero exit, nothing complete-looking in --out.

Each refusal happens before Ray starts. The subprocess runs with a stand-in `ray` package first on its path that
records any import and fails, so a refusal that reached Ray would show up here (and never start a cluster).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

REPO = pathlib.Path(__file__).resolve().parents[1]
COMPLETE = ("model.safetensors", "model.safetensors.index.json", "expo_manifest.json")


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """A fake `ray` that records the import and refuses to load."""
    d = tmp_path_factory.mktemp("shim")
    (d / "ray").mkdir()
    marker = d / "ray_imported"
    (d / "ray" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'a').write('imported\\n')\n"
        "raise ImportError('ray must not be imported before the refusal')\n")
    return d, marker


@pytest.fixture(scope="module")
def pairs(pair_factory):
    return {"small": pair_factory(seed=1), "wide": pair_factory(hidden_size=128, intermediate_size=256, seed=1),
            "sharded": pair_factory("sharded", seed=1)}


def copy_pair(pair, dst: pathlib.Path):
    return tuple(pathlib.Path(shutil.copytree(p, dst / p.name)) for p in pair)


def run_merge(shim, *args, out=None, alpha="0.3"):
    d, marker = shim
    cmd = [sys.executable, "-m", "expo_dist.cli", "merge", "-q"] + [str(a) for a in args]
    if alpha is not None:
        cmd += ["--alpha", alpha]
    if out is not None:
        cmd += ["--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(d), str(REPO)]), HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert not marker.exists(), f"ray was imported before the refusal: {r.stderr}"
    return r


def check_refusal(r, *words, out=None) -> str:
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith("expo-dist: error:"), r.stderr
    assert sum(ln.startswith("expo-dist: error:") for ln in lines) == 1, r.stderr
    for w in words:
        assert str(w) in last, f"{w!r} not in {last!r}"
    assert r.stdout.strip() == "", r.stdout  # stdout carries results only
    if out is not None and os.path.isdir(out):
        for name in COMPLETE:
            assert not os.path.exists(os.path.join(out, name)), f"{name} in --out after a refusal"
        for name in os.listdir(out):
            assert not name.endswith(".safetensors"), name
    return last


def test_tensor_missing_from_one_model(pairs, shim, tmp_path):
    s, a = copy_pair(pairs["small"], tmp_path)
    sd = load_file(str(a / "model.safetensors"))
    victim = "model.layers.1.mlp.up_proj.weight"
    del sd[victim]
    save_file(sd, str(a / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    r = run_merge(shim, "--sft", s, "--aligned", a, out=out)
    check_refusal(r, victim, "only in SFT", out=out)


def test_non_vocab_shape_mismatch(pairs, shim, tmp_path):
    s, a = copy_pair(pairs["small"], tmp_path)
    sd = load_file(str(a / "model.safetensors"))
    victim = "model.layers.0.mlp.down_proj.weight"
    sd[victim] = sd[victim][:, :96].contiguous()
    save_file(sd, str(a / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    r = run_merge(shim, "--sft", s, "--aligned", a, out=out)
    check_refusal(r, victim, "[64, 128]", "[64, 96]", out=out)


def digest(folder: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_out_equal_to_input(pairs, shim, tmp_path):
    s, a = copy_pair(pairs["small"], tmp_path)
    before = digest(a), digest(s)
    r = run_merge(shim, "--sft", s, "--aligned", a, out=a)
    check_refusal(r, str(a), "same as")
    assert (digest(a), digest(s)) == before
    assert not (a / ".expo").exists() and not (a / "expo_manifest.json").exists()
    r = run_merge(shim, "--sft", s, "--aligned", a, "--overwrite", out=s)  # --overwrite must not change that
    check_refusal(r, str(s), "same as")
    assert (digest(a), digest(s)) == before


def test_out_inside_input(pairs, shim, tmp_path):
    s, a = copy_pair(pairs["small"], tmp_path)
    out = s / "merged"
    r = run_merge(shim, "--sft", s, "--aligned", a, out=out)
    check_refusal(r, str(out), "inside", str(s), out=out)
    assert not out.exists()


def test_out_containing_an_input(pairs, shim, tmp_path):
    s, a = copy_pair(pairs["small"], tmp_path)
    r = run_merge(shim, "--sft", s, "--aligned", a, "--overwrite", out=tmp_path)
    check_refusal(r, "contains the input")
    assert (s / "model.safetensors").exists() and (a / "model.safetensors").exists()


def test_non_empty_out_without_overwrite(pairs, shim, tmp_path):
    s, a = pairs["small"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run_merge(shim, "--sft", s, "--aligned", a, out=out)
    check_refusal(r, str(out), "not empty", "--overwrite", out=out)
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("alpha,words", [("nan", ("finite", "'nan'")), ("inf", ("finite",)),
                                         ("abc", ("number", "'abc'"))])
def test_bad_alpha(pairs, shim, tmp_path, alpha, words):
    s, a = pairs["small"]
    out = tmp_path / "out"
    r = run_merge(shim, "--sft", s, "--aligned", a, out=out, alpha=alpha)
    check_refusal(r, "--alpha", *words, out=out)


def test_truncated_shard(pairs, shim, tmp_path):
    s, a = copy_pair(pairs["sharded"], tmp_path)
    victim = sorted(p for p in a.iterdir() if p.name.endswith(".safetensors"))[3]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 100)
    out = tmp_path / "out"
    r = run_merge(shim, "--sft", s, "--aligned", a, out=out)
    check_refusal(r, victim.name, "truncated", out=out)


def test_config_mismatch(pairs, shim, tmp_path):
    s = pairs["small"][0]
    a = pairs["wide"][1]
    out = tmp_path / "out"
    r = run_merge(shim, "--sft", s, "--aligned", a, out=out)
    check_refusal(r, "hidden_size", "64", "128", out=out)


def test_missing_sft_path(pairs, shim, tmp_path):
    a = pairs["small"][1]
    missing = tmp_path / "no-such-model"
    out = tmp_path / "out"
    r = run_merge(shim, "--sft", missing, "--aligned", a, out=out)
    check_refusal(r, str(missing), out=out)


def test_missing_required_option(pairs, shim, tmp_path):
    s, a = pairs["small"]
    r = run_merge(shim, "--sft", s, "--aligned", a, out=tmp_path / "out", alpha=None)
    check_refusal(r, "--alpha")


def test_bad_io_setting(pairs, shim, tmp_path, monkeypatch):
    s, a = pairs["small"]
    monkeypatch.setenv("EXPO_IO", "fast")
    r = run_merge(shim, "--sft", s, "--aligned", a, out=tmp_path / "out")
    check_refusal(r, "EXPO_IO", "'fast'", "auto, direct or buffered", out=tmp_path / "out")
