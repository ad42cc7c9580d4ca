"""`expo-dist verify`: a good merge passes; each kind of damage fails with a line naming the file or tensor."""

import hashlib
import json
import math
import os
import shutil

import pytest

from expo_dist.cli import main
from expo_dist.formats.reader import LocalReader
from expo_dist.formats.safetensors import read_header
from expo_dist.merge import run
from expo_dist.spec import MergeSpec
from expo_dist.verify import verify

ALPHA = 0.3
VOCAB, EXTRA, HIDDEN = 256, 13, 64




@pytest.fixture(scope="module")
def merged(local_ray, pair_factory, tmp_path_factory):
    """Sharded f32 output with a vocabulary extension (copied rows) and a non-float buffer (copied)."""
    sft, aligned = pair_factory("two-shards", dtype="float32", extra_vocab=EXTRA, nonfloat_buffer=True, seed=7)
    out = tmp_path_factory.mktemp("verify") / "out"
    run(MergeSpec(sft=str(sft), aligned=str(aligned), alpha=ALPHA, out=str(out), max_shard_size="200KB",
                  max_task_bytes="1MiB"), progress=False)
    return sft, aligned, out


@pytest.fixture
def damaged(merged, tmp_path):
    """A private copy of the merged folder to damage."""
    copy = tmp_path / "out"
    shutil.copytree(merged[2], copy)
    return copy


def cli(capsys, *argv):
    rc = main(["verify", *map(str, argv)])
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert len(lines) == 1, cap.out  # one verdict line on stdout, details on stderr
    return rc, lines[0], cap.err


def tensor_file(out, name):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return out / index["weight_map"][name]


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def rehash(out, fname):
    """Make the manifest agree with a damaged file, so only recomputing can tell."""
    man = json.loads((out / "expo_manifest.json").read_text())
    data = (out / fname).read_bytes()
    man["files"][fname] = {"file": fname, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (out / "expo_manifest.json").write_text(json.dumps(man))


def test_good_output_structure_only(merged, capsys):
    rc, verdict, err = cli(capsys, merged[2])
    assert rc == 0 and verdict.startswith(f"verify: OK {merged[2]}:"), verdict
    assert "values not recomputed" in verdict and "problem" not in err


def test_good_output_full(merged, capsys):
    sft, aligned, out = merged
    rc, verdict, _ = cli(capsys, out, "--sft", sft, "--aligned", aligned, "--alpha", ALPHA, "--full")
    assert rc == 0, verdict
    assert "all exact" in verdict
    man = json.loads((out / "expo_manifest.json").read_text())
    ops = [t["op"] for t in man["tensors"].values()]
    # every tensor with extrapolated elements recomputed; the two vocab-extended ones and the buffer compared
    assert f"{ops.count('extrapolate') + ops.count('vocab-extended')} extrapolated tensor(s) recomputed" in verdict
    assert "3 copied tensor(s) compared" in verdict


def test_alpha_defaults_to_the_manifest(merged):
    sft, aligned, out = merged
    said = []
    rep = verify(str(out), str(sft), str(aligned), sample=2, say=said.append)
    assert rep.ok and rep.recomputed == 2 and rep.copies == 3
    assert any("alpha 0.3" in s for s in said)


def test_sample_is_seeded(merged):
    sft, aligned, out = merged
    picks = []
    for seed in (0, 0, 1):
        said = []
        rep = verify(str(out), str(sft), str(aligned), ALPHA, sample=3, seed=seed, verbose=True, say=said.append)
        assert rep.ok and rep.recomputed == 3
        picks.append({s.split(":")[0] for s in said if "extrapolated elements exact" in s})
    assert picks[0] == picks[1] and picks[0] != picks[2]


def test_reads_in_bounded_chunks(merged, monkeypatch):
    """Tensors are read a chunk of elements at a time, never whole."""
    sft, aligned, out = merged
    sizes = []
    real = LocalReader.read_into  # every read of tensor bytes (headers and sha256 read through other calls)

    def spy(self, view, offset):
        sizes.append(len(view))
        return real(self, view, offset)

    monkeypatch.setattr(LocalReader, "read_into", spy)
    rep = verify(str(out), str(sft), str(aligned), ALPHA, sample=None, chunk_elems=1000, say=lambda m: None)
    assert rep.ok and rep.elements > 100_000
    assert max(sizes) <= 1000 * 4 and len(sizes) > 3 * rep.elements // 1000


def test_wrong_alpha_fails(merged, capsys):
    sft, aligned, out = merged
    rc, verdict, err = cli(capsys, out, "--sft", sft, "--aligned", aligned, "--alpha", "0.31", "--sample", "1")
    assert rc == 1 and verdict.startswith("verify: FAILED")
    assert "differ from the float64 reference" in verdict and "problem:" in err


def test_extrapolated_value_damaged(merged, damaged, capsys):
    sft, aligned, _ = merged
    name = "model.layers.1.mlp.down_proj.weight"
    path = tensor_file(damaged, name)
    flip(path, read_header(str(path)).tensors[name].begin + 4 * 1234 + 2)
    rc, verdict, _ = cli(capsys, damaged)  # the manifest's sha256 catches it
    assert rc == 1 and "sha256" in verdict and path.name in verdict
    rehash(damaged, path.name)
    rc, verdict, _ = cli(capsys, damaged)  # now only recomputing can
    assert rc == 0
    rc, verdict, _ = cli(capsys, damaged, "--sft", sft, "--aligned", aligned, "--full")
    assert rc == 1
    assert f"tensor '{name}': 1 extrapolated element(s) differ from the float64 reference" in verdict
    assert "first at element 1234" in verdict


def test_vocab_rows_and_buffer_are_always_checked(merged, damaged, capsys):
    sft, aligned, _ = merged
    emb = "model.embed_tokens.weight"
    path = tensor_file(damaged, emb)
    row = VOCAB + 5  # a row the aligned model added: must be the aligned model's bytes
    flip(path, read_header(str(path)).tensors[emb].begin + (row * HIDDEN + 3) * 4)
    rehash(damaged, path.name)
    buf = "model.extra_buffer.position_ids"
    bpath = tensor_file(damaged, buf)
    flip(bpath, read_header(str(bpath)).tensors[buf].begin + 8 * 7)
    rehash(damaged, bpath.name)
    said = []
    rep = verify(str(damaged), str(sft), str(aligned), ALPHA, sample=0, say=said.append)  # no tensor sampled
    assert not rep.ok and rep.recomputed == 0
    assert any(p.startswith(f"tensor '{emb}': 1 copied element(s) differ from the aligned model; "
                            f"first at element {row * HIDDEN + 3}") for p in rep.problems), rep.problems
    assert any(p.startswith(f"tensor '{buf}': 1 copied element(s) differ from the aligned model") for p in rep.problems)


def test_index_missing_a_tensor(damaged, capsys):
    p = damaged / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    del index["weight_map"]["model.norm.weight"]
    p.write_text(json.dumps(index))
    rc, verdict, _ = cli(capsys, damaged)
    assert rc == 1 and "not in weight_map: model.norm.weight" in verdict


def test_index_total_size_wrong(damaged, capsys):
    p = damaged / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    index["metadata"]["total_size"] += 2
    p.write_text(json.dumps(index))
    rc, verdict, _ = cli(capsys, damaged)
    assert rc == 1 and "metadata.total_size" in verdict


def test_shard_missing(damaged, capsys):
    victim = sorted(damaged.glob("model-*.safetensors"))[1]
    victim.unlink()
    rc, verdict, _ = cli(capsys, damaged)
    assert rc == 1 and f"names {victim.name}, which is missing" in verdict


def test_shard_truncated(damaged, capsys):
    victim = sorted(damaged.glob("model-*.safetensors"))[0]
    os.truncate(victim, victim.stat().st_size - 10)
    rc, verdict, _ = cli(capsys, damaged)
    assert rc == 1 and victim.name in verdict and "truncated" in verdict


def test_manifest_missing(damaged, capsys):
    (damaged / "expo_manifest.json").unlink()
    rc, verdict, _ = cli(capsys, damaged)
    assert rc == 1 and "expo_manifest.json: missing" in verdict


def test_unfinished_merge(damaged, capsys):
    (damaged / ".expo").mkdir()
    rc, verdict, _ = cli(capsys, damaged)
    assert rc == 1 and "did not finish" in verdict


def test_side_file_differs(merged, damaged, capsys):
    sft, aligned, _ = merged
    (damaged / "tokenizer_config.json").write_text("{}")
    rc, verdict, _ = cli(capsys, damaged, "--sft", sft, "--aligned", aligned, "--sample", "0")
    assert rc == 1 and "tokenizer_config.json: differs from the aligned model's" in verdict


def test_usage_errors_exit_2(merged, capsys, tmp_path):
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["verify", str(merged[2]), "--sft", str(merged[0])]) == 2
    assert "give both --sft and --aligned" in capsys.readouterr().err
    assert main(["verify", str(merged[2]), "--sft", str(merged[0]), "--aligned", str(merged[1]),
                 "--alpha", "nan"]) == 2
    assert "finite" in capsys.readouterr().err


def test_single_file_output(local_ray, pair_factory, tmp_path, capsys):
    sft, aligned = pair_factory("tied", dtype="bfloat16", seed=2)
    out = tmp_path / "out"
    run(MergeSpec(sft=str(sft), aligned=str(aligned), alpha=0.5, out=str(out)), progress=False)
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    rc, verdict, _ = cli(capsys, out, "--sft", sft, "--aligned", aligned, "--full")
    assert rc == 0 and "all exact" in verdict and "1 file(s)" in verdict


# ---- every dtype merge copies: FP8 and unsigned integers ---------------------------------------------------------

EXTRA_DTYPES = {  # name -> (torch dtype, shape); merge copies these from the aligned model
    "model.extra.fp8_e4m3": ("float8_e4m3fn", (64, 48)),
    "model.extra.fp8_e5m2": ("float8_e5m2", (40, 32)),
    "model.extra.u16": ("uint16", (300,)),
    "model.extra.u32": ("uint32", (200,)),
    "model.extra.u64": ("uint64", (100,)),
}


def add_extra_dtypes(folder, seed):
    """Add FP8 and unsigned-integer tensors to a single-file model (SFT and aligned differ in every one)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = str(folder / "model.safetensors")
    sd = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for name, (dt, shape) in EXTRA_DTYPES.items():
        raw = torch.randint(0, 256, (math.prod(shape) * getattr(torch, dt).itemsize,),
                            generator=g, dtype=torch.uint8)
        if dt == "float8_e4m3fn":
            raw[:3] = torch.tensor([0x7F, 0xFF, 0x00], dtype=torch.uint8)  # NaN, -NaN, 0: NaN in the data
        sd[name] = raw.view(getattr(torch, dt)).reshape(shape)
    save_file(sd, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def merged_dtypes(local_ray, pair_factory, tmp_path_factory):
    """A sharded output whose extra tensors are FP8 (e4m3, e5m2) and U16/U32/U64, as merge copies them."""
    sft, aligned = pair_factory(dtype="bfloat16", seed=11, private=True)
    add_extra_dtypes(sft, 1)
    add_extra_dtypes(aligned, 2)
    out = tmp_path_factory.mktemp("dtypes") / "out"
    run(MergeSpec(sft=str(sft), aligned=str(aligned), alpha=ALPHA, out=str(out), max_shard_size="60KB",
                  max_task_bytes="1MiB"), progress=False)
    man = json.loads((out / "expo_manifest.json").read_text())
    assert {n: man["tensors"][n]["op"] for n in EXTRA_DTYPES} == dict.fromkeys(EXTRA_DTYPES, "copy")
    assert {man["tensors"][n]["dtype"] for n in EXTRA_DTYPES} == {"F8_E4M3", "F8_E5M2", "U16", "U32", "U64"}
    return sft, aligned, out


def test_fp8_and_unsigned_outputs_verify(merged_dtypes, capsys):
    sft, aligned, out = merged_dtypes
    rc, verdict, err = cli(capsys, out, "--sft", sft, "--aligned", aligned, "--full")
    assert rc == 0 and "all exact" in verdict, verdict + err
    assert "Traceback" not in err
    rep = verify(str(out), str(sft), str(aligned), sample=0, say=lambda m: None)
    assert rep.ok and rep.copies == len(EXTRA_DTYPES) and rep.nonfinite_in >= 2 and rep.nonfinite_out >= 2


@pytest.mark.parametrize("name", sorted(EXTRA_DTYPES))
def test_fp8_and_unsigned_damage_fails(merged_dtypes, tmp_path, capsys, name):
    sft, aligned, good = merged_dtypes
    out = tmp_path / "out"
    shutil.copytree(good, out)
    path = tensor_file(out, name)
    entry = read_header(str(path)).tensors[name]
    k = 37  # an element in the middle: one byte of it
    item = (entry.end - entry.begin) // math.prod(EXTRA_DTYPES[name][1])  # bytes per element
    flip(path, entry.begin + k * item + item - 1)
    rehash(out, path.name)  # the sha256 agrees: only comparing with the inputs can tell
    rc, verdict, err = cli(capsys, out, "--sft", sft, "--aligned", aligned, "--sample", "0")
    assert rc == 1 and "Traceback" not in err, verdict + err
    assert f"tensor '{name}': 1 copied element(s) differ from the aligned model; first at element {k}" in verdict
