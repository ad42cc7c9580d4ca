"""Alpha sweeps (one read, K outputs) and per-tensor alpha rules, exact to the element."""

import json
import os

from expo_dist.merge import run
from expo_dist.spec import MergeSpec
from expo_dist.testing.reference import assert_exact, expected_bytes, load_dtypes, load_model, tensor_bytes


def test_sweep_writes_each_alpha_exactly_from_one_read(local_ray, pair_factory, tmp_path):
    sft, aligned = pair_factory("two-shards", seed=8)
    single = run(MergeSpec(sft=str(sft), aligned=str(aligned), alpha=0.3, out=str(tmp_path / "one"),
                           max_shard_size="200KB"), progress=False)
    m = run(MergeSpec(sft=str(sft), aligned=str(aligned), alpha=[0.1, 0.3, 0.5], out=str(tmp_path / "sweep"),
                      max_shard_size="200KB"), progress=False)
    assert sorted(os.listdir(tmp_path / "sweep")) == ["alpha-0.1", "alpha-0.3", "alpha-0.5"]
    for a in (0.1, 0.3, 0.5):
        out = tmp_path / "sweep" / f"alpha-{a:g}"
        assert_exact(str(out), str(sft), str(aligned), a, tie=False)
        man = json.loads((out / "expo_manifest.json").read_text())
        assert man["alpha"] == a and man["sweep"] == [0.1, 0.3, 0.5]
        # the sweep read the inputs once: the same bytes as the single-alpha run
        assert man["bytes_read"] == single["bytes_read"] > 0
    for f in os.listdir(tmp_path / "one"):
        if f.endswith(".safetensors"):
            assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "sweep" / "alpha-0.3" / f).read_bytes()
    assert m["outputs"]["0.5"].endswith("alpha-0.5")


def test_rules_give_each_tensor_its_alpha(local_ray, pair_factory, tmp_path):
    sft, aligned = pair_factory(num_layers=3, seed=9)
    rules = [{"match": "model.embed_tokens.*", "alpha": 0},
             {"regex": r"model\.layers\.2\..*", "scale": 0.5}]
    out = tmp_path / "o"
    run(MergeSpec(sft=str(sft), aligned=str(aligned), alpha=0.4, out=str(out), alpha_rules=rules), progress=False)
    got = load_model(str(out))
    s, a, dt = load_model(str(sft)), load_model(str(aligned)), load_dtypes(str(aligned))
    by_alpha = {al: expected_bytes(s, a, dt, al, tie=False) for al in (0.0, 0.2, 0.4)}
    for name, t in got.items():
        want = 0.0 if name.startswith("model.embed_tokens") else 0.2 if name.startswith("model.layers.2.") else 0.4
        assert tensor_bytes(t) == by_alpha[want][name], name
    assert tensor_bytes(got["model.embed_tokens.weight"]) == tensor_bytes(a["model.embed_tokens.weight"])
    man = json.loads((out / "expo_manifest.json").read_text())
    assert man["tensors"]["model.layers.2.mlp.up_proj.weight"]["alpha"] == 0.2
    assert man["alpha_rules"] == rules
    assert "model.embed_tokens.*" in (out / "README.md").read_text()


def test_verify_follows_the_recorded_rules(local_ray, pair_factory, tmp_path, capsys):
    from expo_dist.cli import main

    sft, aligned = pair_factory(num_layers=2, seed=10)
    out = tmp_path / "o"
    run(MergeSpec(sft=str(sft), aligned=str(aligned), alpha=0.4, out=str(out),
                  alpha_rules=[{"match": "model.layers.1.*", "alpha": 0.1}]), progress=False)
    assert main(["verify", str(out), "--sft", str(sft), "--aligned", str(aligned), "--full"]) == 0
    assert capsys.readouterr().out.startswith("verify: OK")
    # a folder whose rule tensors were made with the plain alpha fails
    other = tmp_path / "plain"
    run(MergeSpec(sft=str(sft), aligned=str(aligned), alpha=0.4, out=str(other)), progress=False)
    import json as _json

    man = _json.loads((other / "expo_manifest.json").read_text())
    man["alpha_rules"] = [{"match": "model.layers.1.*", "alpha": 0.1}]
    (other / "expo_manifest.json").write_text(_json.dumps(man))
    assert main(["verify", str(other), "--sft", str(sft), "--aligned", str(aligned), "--full"]) == 1
    assert "model.layers.1." in capsys.readouterr().out
