"""The synthetic pair generator: real HF Llama layout, valid safetensors, sharding, determinism, side files."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from expo_dist.testing import synth

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = pathlib.Path(__file__).resolve().parents[1]
ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def shard_files(folder: pathlib.Path) -> dict[str, list[str]]:
    """file → tensor names, from the index (or the single file)."""
    idx = folder / "model.safetensors.index.json"
    if not idx.exists():
        assert (folder / "model.safetensors").exists()
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {"model.safetensors": list(f.keys())}
    out: dict[str, list[str]] = {}
    for name, fname in json.loads(idx.read_text())["weight_map"].items():
        out.setdefault(fname, []).append(name)
    return out


def load_all(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    sd = {}
    for fname in shard_files(folder):
        sd.update(load_file(folder / fname))
    return sd


def headers(path: pathlib.Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), n


@pytest.fixture(scope="module")
def pair(pair_factory):
    return pair_factory("sharded", nonfloat_buffer=True, seed=3)


def expected_saved_keys(model) -> dict[str, tuple]:
    """state_dict names/shapes as save_pretrained writes them: tied aliases dropped."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = tuple(v.shape)
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_layout_matches_transformers(pair_factory, tie):
    from transformers import AutoConfig, LlamaForCausalLM

    sft, aligned = pair_factory(tie_word_embeddings=tie, extra_vocab=5, num_layers=3, sft_shard_bytes=50_000)
    for folder, vocab in ((sft, 256), (aligned, 261)):
        cfg = AutoConfig.from_pretrained(folder)
        assert cfg.vocab_size == vocab and cfg.tie_word_embeddings == tie and cfg.num_hidden_layers == 3
        want = expected_saved_keys(LlamaForCausalLM(cfg))
        assert ("lm_head.weight" in want) == (not tie)
        got = {k: tuple(v.shape) for k, v in load_all(folder).items()}
        assert list(got) and got == want
        assert synth.llama_shapes(64, 128, 3, 4, 2, vocab, tie) == want
        assert list(synth.llama_shapes(64, 128, 3, 4, 2, vocab, tie)) == list(want)  # state_dict order
        # transformers itself loads it with nothing missing, unexpected or mismatched
        model, info = LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        sd = load_all(folder)
        assert torch.equal(model.model.embed_tokens.weight.detach().to(torch.bfloat16),
                           sd["model.embed_tokens.weight"])


def test_files_are_byte_identical_to_safetensors_writer(pair, tmp_path):
    for folder in pair:
        for fname in shard_files(folder):
            tensors = load_file(folder / fname)
            save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
            assert (folder / fname).read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), fname
            hdr, n = headers(folder / fname)
            assert n % 8 == 0 and hdr["__metadata__"] == {"format": "pt"}


def test_index_and_different_shard_boundaries(pair):
    layouts = []
    for folder, limit in zip(pair, (40_000, 27_000)):
        idx = json.loads((folder / "model.safetensors.index.json").read_text())
        sd = load_all(folder)
        files = shard_files(folder)
        assert set(idx["weight_map"]) == set(sd) and len(sd) == 2 + 2 * 9 + 1 + 1
        assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
        assert sorted(files) == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
        assert set(os.listdir(folder)) >= set(files)
        for fname, names in files.items():
            nbytes = sum(sd[n].numel() * sd[n].element_size() for n in names)
            assert nbytes <= limit or len(names) == 1
            hdr, n = headers(folder / fname)
            assert (folder / fname).stat().st_size == 8 + n + nbytes
        # state_dict order is kept across shards: concatenating the shards gives llama_shapes order
        want = list(synth.llama_shapes(64, 128, 2, 4, 2, 256, False)) + [synth.BUFFER_NAME]
        assert [n for f in sorted(files) for n in sorted(files[f], key=want.index)] == want
        layouts.append({frozenset(v) for v in files.values()})
    assert layouts[0] != layouts[1]


def test_values(pair):
    s, a = (load_all(f) for f in pair)
    assert set(s) == set(a)
    for name in s:
        if name == synth.BUFFER_NAME:
            assert s[name].dtype == a[name].dtype == torch.int64
            assert torch.equal(s[name], torch.arange(64)) and torch.equal(a[name], s[name])
            continue
        assert s[name].dtype == a[name].dtype == torch.bfloat16
        sf, af = s[name].double(), a[name].double()
        d = af - sf
        assert 0.007 < d.std().item() < 0.013, name  # delta_scale 0.01
        if name.endswith("norm.weight"):
            assert abs(sf.mean().item() - 1.0) < 0.01
        else:
            assert 0.017 < sf.std().item() < 0.023 and abs(sf.mean().item()) < 0.005


def test_determinism(tmp_path):
    kw = dict(extra_vocab=3, sft_shard_bytes=30_000, aligned_shard_bytes=45_000, nonfloat_buffer=True, seed=7)
    p1 = synth.make_pair(tmp_path / "one", **kw)
    p2 = synth.make_pair(tmp_path / "two", **kw)
    p3 = synth.make_pair(tmp_path / "three", **dict(kw, seed=8))
    for f1, f2, f3 in zip(p1, p2, p3):
        names = sorted(os.listdir(f1))
        assert names == sorted(os.listdir(f2))
        for n in names:
            assert (f1 / n).read_bytes() == (f2 / n).read_bytes(), n
        w1, w3 = load_all(f1), load_all(f3)
        assert not torch.equal(w1["model.layers.0.mlp.up_proj.weight"], w3["model.layers.0.mlp.up_proj.weight"])


def test_regenerating_removes_stale_shards(tmp_path):
    synth.make_pair(tmp_path, sft_shard_bytes=20_000)
    sft, _ = synth.make_pair(tmp_path)
    assert sorted(p.name for p in sft.glob("model*")) == ["model.safetensors"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtypes_and_extra_vocab_in_chunks(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(synth, "CHUNK_ELEMS", 1000)  # many chunks per tensor, one crossing the vocab boundary
    sft, aligned = synth.make_pair(tmp_path, dtype=dtype, extra_vocab=37, vocab_size=100, delta_scale=0.05,
                                   aligned_shard_bytes=60_000)
    s, a = load_all(sft), load_all(aligned)
    for folder in (sft, aligned):
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg.get("dtype", cfg.get("torch_dtype")) == dtype
        for fname in shard_files(folder):
            hdr, _ = headers(folder / fname)
            assert {v["dtype"] for k, v in hdr.items() if k != "__metadata__"} == {ST_DTYPE[dtype]}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert s[name].shape == (100, 64) and a[name].shape == (137, 64)
        d = a[name][:100].double() - s[name].double()
        assert 0.04 < d.std().item() < 0.06 and d.abs().max().item() < 0.4
        extra = a[name][100:].double()
        assert 0.015 < extra.std().item() < 0.025  # fresh rows, not sft + delta
    assert json.loads((aligned / "config.json").read_text())["vocab_size"] == 137
    d = a["model.layers.1.mlp.down_proj.weight"].double() - s["model.layers.1.mlp.down_proj.weight"].double()
    assert 0.04 < d.std().item() < 0.06


def test_tokenizer_and_side_files(pair_factory):
    from transformers import AutoTokenizer, GenerationConfig

    sft, aligned = pair_factory(extra_vocab=4, vocab_size=300)
    for folder, vocab in ((sft, 300), (aligned, 304)):
        for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja"):
            assert (folder / f).is_file(), f
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        cfg = json.loads((folder / "config.json").read_text())
        assert len(tok) == vocab == cfg["vocab_size"]
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"],
                                                                         cfg["pad_token_id"])
        ids = tok("hello world", add_special_tokens=False).input_ids
        assert len(ids) == 2 and tok.unk_token_id not in ids
        assert tok.decode(ids) == "hello world"
        assert max(tok.get_vocab().values()) == vocab - 1
        gen = GenerationConfig.from_pretrained(folder)
        assert gen.eos_token_id == cfg["eos_token_id"]
    tok = AutoTokenizer.from_pretrained(aligned, local_files_only=True)
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nhello</s>\n<|assistant|>\n"
    assert (sft / "chat_template.jinja").read_text() != (aligned / "chat_template.jinja").read_text()


def test_presets_and_sizes():
    kw = synth.mistral7b_shapes_kwargs()
    shapes = synth.llama_shapes(**kw)
    nbytes = 2 * sum(math.prod(s) for s in shapes.values())
    assert len(shapes) == 2 + 8 * 9 + 1 and 3.9e9 < nbytes < 4.1e9
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    assert synth.parse_size("5GB") == 5 * 10**9 and synth.parse_size("64MiB") == 64 << 20
    assert synth.parse_size("1000000") == 10**6 and synth.parse_size("7 MB") == 7 * 10**6
    with pytest.raises(ValueError):
        synth.parse_size("lots")
    with pytest.raises(ValueError):
        synth.make_pair("/nonexistent/never", dtype="int8")
    with pytest.raises(ValueError):
        synth.llama_shapes(65, 128, 1, 4, 2, 256, False)


def test_cli(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "make_pair.py"), str(tmp_path / "p"), "--layers", "1",
                        "--sft-shard-bytes", "30KB", "--aligned-shard-bytes", "20KiB", "--tie", "--extra-vocab", "2",
                        "--dtype", "float16"], capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    assert lines == [str(tmp_path / "p" / "sft"), str(tmp_path / "p" / "aligned")]
    a = load_all(pathlib.Path(lines[1]))
    assert "lm_head.weight" not in a and a["model.embed_tokens.weight"].shape == (258, 64)
    assert a["model.norm.weight"].dtype == torch.float16
    assert "wrote" in r.stderr
