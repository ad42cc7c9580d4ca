"""`expo-dist plan` reports what `merge` then does, reading headers only; refusals exit non-zero."""

import json
import os

from expo_dist.cli import main


def test_plan_matches_merge(local_ray, pair_factory, tmp_path, capsys):
    sft, aligned = pair_factory(hidden_size=128, intermediate_size=384, vocab_size=2000, extra_vocab=3,
                                sft_shard_bytes=300_000, aligned_shard_bytes=200_000, seed=6)
    args = ["--sft", str(sft), "--aligned", str(aligned), "--alpha", "0.3", "--max-shard-size", "400KB",
            "--max-task-bytes", "1MiB"]
    assert main(["plan", *args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    out = tmp_path / "o"
    assert main(["merge", *args, "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    man = json.loads((out / "expo_manifest.json").read_text())
    assert report["tasks"] == man["tasks"] and report["device"] == "auto"
    assert report["bytes_read"] == man["bytes_read"]
    assert [(s["file"], s["bytes"]) for s in report["shards"]] == \
        [(f, os.path.getsize(out / f)) for f in sorted(man["files"])]
    assert report["bytes_written"] == sum(os.path.getsize(out / f) for f in man["files"])
    assert report["tensors"]["vocab-extended"] == 2 and report["tensors"]["extrapolate"] == len(man["tensors"]) - 2
    assert {n for n, d in man["tensors"].items() if d["op"] == "vocab-extended"} == set(report["decisions"])
    # the human form names the same things
    assert main(["plan", *args]) == 0
    text = capsys.readouterr().out
    assert f"in {report['tasks']} tasks" in text and "vocab-extended" in text


def test_plan_refuses_mismatch_naming_tensors(pair_factory, capsys):
    from safetensors.torch import load_file, save_file

    sft, aligned = pair_factory(seed=1, private=True)
    path = os.path.join(aligned, "model.safetensors")
    sd = load_file(path)
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.down_proj.weight"][:, :-1].contiguous()
    save_file(sd, path, metadata={"format": "pt"})
    assert main(["plan", "--sft", str(sft), "--aligned", str(aligned), "--alpha", "0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("expo-dist: error: models do not match in 2 tensor(s)")
    assert "model.layers.1.mlp.up_proj.weight (only in SFT)" in err[0]
    assert "model.layers.0.mlp.down_proj.weight (shape" in err[0]
