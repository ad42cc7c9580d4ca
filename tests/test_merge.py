"""End-to-end merges on one embedded Ray: exactness, byte identity, transformers loading, side files."""

import json
import os

import pytest
import torch

from expo_dist.merge import run
from expo_dist.spec import MergeSpec
from expo_dist.testing.reference import assert_exact, load_model

ALPHA = 0.3


def merge(sft, aligned, out, **kw):
    spec = MergeSpec(sft=str(sft), aligned=str(aligned), alpha=kw.pop("alpha", ALPHA), out=str(out), **kw)
    return run(spec, progress=False)


def weight_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") or f.endswith(".index.json"))


CASES = {
    "bf16-untied": dict(dtype="bfloat16"),
    "f16-tied": dict(dtype="float16", tie_word_embeddings=True),
    "f32-extvocab-buffer": dict(dtype="float32", extra_vocab=13, nonfloat_buffer=True),
    "bf16-tied-extvocab-buffer": dict(dtype="bfloat16", tie_word_embeddings=True, extra_vocab=7,
                                      nonfloat_buffer=True),
    # alpha = 1/2 + 2^-30 with 1-ulp differences puts results just past rounding midpoints: torch's own
    # float64 -> bf16/f16 conversion (via float32, two roundings) gets a large share of these wrong
    "bf16-midpoints": dict(dtype="bfloat16", delta_scale=1e-4, alpha=0.5 + 2**-30),
    "f16-midpoints": dict(dtype="float16", delta_scale=1e-5, alpha=0.5 + 2**-30),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_every_element(local_ray, pair_factory, tmp_path, case):
    kw = dict(CASES[case])
    alpha = kw.pop("alpha", ALPHA)
    sft, aligned = pair_factory("two-shards", seed=3, **kw)
    out = tmp_path / "out"
    manifest = merge(sft, aligned, out, max_shard_size="200KB", max_task_bytes="1MiB", alpha=alpha)
    n = assert_exact(str(out), str(sft), str(aligned), alpha, tie=kw.get("tie_word_embeddings", False))
    assert n > 50_000
    # the manifest hashes what is on disk
    import hashlib

    for fname, rec in manifest["files"].items():
        data = (out / fname).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec["sha256"] and len(data) == rec["size"]
    ops = {t["op"] for t in manifest["tensors"].values()}
    if kw.get("extra_vocab"):
        assert "vocab-extended" in ops
    if kw.get("nonfloat_buffer"):
        assert manifest["tensors"]["model.extra_buffer.position_ids"]["op"] == "copy"
    if kw.get("tie_word_embeddings"):
        assert "lm_head.weight" not in load_model(str(out))
    assert not (out / ".expo").exists()


@pytest.fixture(scope="module")
def mid_pair(pair_factory):
    """A pair whose large tensors are several MiB, so 1 MiB tasks split each into several tasks."""
    return pair_factory("mid", seed=11)


@pytest.fixture(scope="module")
def baseline(local_ray, mid_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "out"
    merge(*mid_pair, out, workers=1, max_shard_size="8MB")
    return out


def test_baseline_exact(baseline, mid_pair):
    assert_exact(str(baseline), str(mid_pair[0]), str(mid_pair[1]), ALPHA, tie=False)
    assert len(weight_files(baseline)) >= 3  # sharded with an index


@pytest.mark.parametrize("kw", [dict(workers=3), dict(workers=2, max_task_bytes="1MiB"),
                                dict(workers=2, io="buffered"), dict(workers=2, io="direct")],
                         ids=["workers3", "tasks1MiB", "io-buffered", "io-direct"])
def test_byte_identical(baseline, mid_pair, tmp_path, kw):
    """Same bytes whatever the number of workers, the task size, or how the workers do their I/O (the
    baseline ran with the default --io auto: direct I/O where the temp folder is on ext4/xfs/btrfs)."""
    out = tmp_path / "out"
    manifest = merge(*mid_pair, out, max_shard_size="8MB", **kw)
    assert manifest["settings"]["io"] == kw.get("io", "auto")
    if "max_task_bytes" in kw:
        # every tensor larger than a task is cut into several tasks
        assert manifest["tasks"] >= sum(os.path.getsize(baseline / f) for f in weight_files(baseline)) // (1 << 20)
    else:
        assert len([w for w in manifest["workers"] if w["tasks"] > 0]) >= 2
    assert weight_files(out) == weight_files(baseline)
    for f in weight_files(baseline):
        assert (out / f).read_bytes() == (baseline / f).read_bytes(), f


def test_transformers_loads_and_logits_match(baseline, mid_pair):
    from transformers import AutoConfig, AutoModelForCausalLM

    from expo_dist.testing.reference import expected_bytes, load_dtypes

    model, info = AutoModelForCausalLM.from_pretrained(str(baseline), dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    exp = expected_bytes(load_model(str(mid_pair[0])), load_model(str(mid_pair[1])), load_dtypes(str(mid_pair[1])),
                         ALPHA, tie=False)
    aligned = load_model(str(mid_pair[1]))
    ref_sd = {k: torch.frombuffer(bytearray(v), dtype=aligned[k].dtype).reshape(aligned[k].shape).to(torch.float32)
              for k, v in exp.items()}
    ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(baseline)), dtype=torch.float32)
    missing, unexpected = ref.load_state_dict(ref_sd, strict=True)
    ids = torch.tensor([[1, 5, 17, 42, 99, 250, 1023, 2999]])
    with torch.no_grad():
        got = model(ids).logits
        want = ref(ids).logits
    assert torch.equal(got, want)
    # and the extrapolation really moved the model away from the aligned one
    base = AutoModelForCausalLM.from_pretrained(str(mid_pair[1]), dtype=torch.float32)
    with torch.no_grad():
        assert not torch.equal(base(ids).logits, got)


def test_side_files_card_and_manifest(baseline, mid_pair):
    aligned = mid_pair[1]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja"):
        assert (baseline / name).read_bytes() == (aligned / name).read_bytes(), name
    card = (baseline / "README.md").read_text()
    assert card.startswith("---\n")
    front = card.split("---\n")[1]
    import yaml

    meta = yaml.safe_load(front)
    assert set(meta["base_model"]) == {str(mid_pair[0]), str(mid_pair[1])}
    assert {"expo", "merge"} <= set(meta["tags"])
    assert "alpha: 0.3" in card and "theta_aligned - theta_sft" in card
    man = json.loads((baseline / "expo_manifest.json").read_text())
    assert man["alpha"] == ALPHA and man["sft"] == str(mid_pair[0]) and man["aligned"] == str(mid_pair[1])
    assert man["version"] and set(man["files"]) == {f for f in weight_files(baseline) if f.endswith(".safetensors")}
    index = json.loads((baseline / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in load_model(str(baseline)).values())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(baseline))
    assert len(tok) == json.loads((baseline / "config.json").read_text())["vocab_size"]


def test_workers_import_the_drivers_expo_dist_whatever_the_current_folder(tmp_path, mid_pair):
    """Ray puts the driver's current folder first on its workers' sys.path: a merge started from a folder that
    holds another expo_dist (an old checkout) must still run the driver's code in its workers."""
    import subprocess
    import sys

    here = tmp_path / "elsewhere"
    (here / "expo_dist").mkdir(parents=True)
    (here / "expo_dist" / "__init__.py").write_text("raise ImportError('the expo_dist of the current folder')\n")
    exe = os.path.join(os.path.dirname(sys.executable), "expo-dist")
    if not os.path.exists(exe):
        pytest.skip("the expo-dist console script is not installed next to this Python")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    out = tmp_path / "out"
    r = subprocess.run([exe, "merge", "--sft", str(mid_pair[0]), "--aligned", str(mid_pair[1]), "--alpha", str(ALPHA),
                        "--out", str(out), "--workers", "2", "-q"], cwd=here, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the expo_dist of the current folder" not in r.stderr
    assert (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists()
