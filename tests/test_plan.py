"""The pure planner: matching, vocab extension, tied embeddings, shard layout, task cutting. No Ray, no I/O
except where a generated pair is read to check that the plan points at the right input bytes."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from expo_dist.errors import ExpoError
from expo_dist.formats.dtypes import itemsize
from expo_dist.formats.safetensors import TensorEntry
from expo_dist.planning.plan import COPY, EXTRAPOLATE, MIB, make_plan, natural_key, parse_size
from expo_dist.sources.index import TensorRef, index_model
from expo_dist.testing import synth

CFG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
       "num_hidden_layers": 2, "num_attention_heads": 4, "tie_word_embeddings": False}


def fake_sources(spec: dict[str, tuple[str, tuple[int, ...]]], prefix: str, header: int = 4096,
                 per_file: int | None = None) -> dict[str, TensorRef]:
    """Place tensors one after another in made-up files (a new file every per_file tensors)."""
    out, pos, k = {}, header, 0
    for i, (name, (dtype, shape)) in enumerate(spec.items()):
        if per_file and i and i % per_file == 0:
            k, pos = k + 1, header + 8 * k  # a different header length per file
        n = math.prod(shape) * itemsize(dtype)
        out[name] = TensorRef(f"/in/{prefix}-{k}.safetensors", TensorEntry(name, dtype, tuple(shape), pos, pos + n))
        pos += n
    return out


def llama_spec(dtype="BF16", h=512, inter=1024, layers=3, vocab=1000, tie=False, extra=None):
    spec = {n: (dtype, s) for n, s in synth.llama_shapes(h, inter, layers, 4, 2, vocab, tie).items()}
    spec.update(extra or {})
    return spec


def plan_for(sft, aligned, alpha=0.3, sft_cfg=None, aligned_cfg=None, **kw):
    return make_plan(sft, aligned, alpha_for=lambda n: alpha, sft_config=sft_cfg if sft_cfg is not None else CFG,
                     aligned_config=aligned_cfg if aligned_cfg is not None else CFG, **kw)


def natural(name):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def greedy_groups(spec: dict[str, tuple[str, tuple[int, ...]]], limit: int) -> list[list[str]]:
    """Walk tensors in natural name order; start a new shard when the next would pass the limit."""
    groups, size = [], 0
    for name in sorted(spec, key=natural):
        n = math.prod(spec[name][1]) * itemsize(spec[name][0])
        if not groups or (groups[-1] and size + n > limit):
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


# ---- (a) coverage: every output byte in exactly one task and one segment ----

def check_coverage(plan, max_task_bytes=None):
    by_file = {}
    for t in plan.tasks:
        by_file.setdefault(t.file, []).append(t)
    assert [t.id for t in plan.tasks] == list(range(len(plan.tasks)))
    assert set(by_file) <= {s.file for s in plan.shards}
    for si, shard in enumerate(plan.shards):
        lay = shard.layout
        start, end = len(lay.header), lay.size
        tasks = sorted(by_file.get(shard.file, []), key=lambda t: t.begin)
        if start == end:
            assert not tasks
            continue
        assert tasks[0].begin == start and tasks[-1].end == end
        for prev, nxt in zip(tasks, tasks[1:]):
            assert prev.end == nxt.begin  # no gap, no overlap
        for t in tasks:
            assert t.shard == si and t.file == shard.file
            assert start <= t.begin < t.end <= end  # never crosses the file
            for off in (t.begin, t.end):
                assert off in (start, end) or off % MIB == 0, (t, off)
            if max_task_bytes and max_task_bytes % MIB == 0:
                assert t.nbytes <= max_task_bytes
            pos = t.begin
            for seg in t.segments:  # segments tile the task, in file order, each inside one tensor
                assert seg.out_offset == pos
                entry = lay.tensors[seg.tensor]
                assert seg.out_dtype == entry.dtype
                assert entry.begin <= seg.out_offset and seg.out_offset + seg.out_bytes <= entry.end
                assert (seg.out_offset - entry.begin) % itemsize(entry.dtype) == 0
                assert seg.count > 0
                pos += seg.out_bytes
            assert pos == t.end
    # every tensor's bytes are written exactly once (zero-size tensors have none)
    written = {}
    for t in plan.tasks:
        for seg in t.segments:
            written[seg.tensor] = written.get(seg.tensor, 0) + seg.out_bytes
    for shard in plan.shards:
        for name, e in shard.layout.tensors.items():
            assert written.get(name, 0) == e.nbytes, name


@pytest.mark.parametrize("max_task", [MIB, 3 * MIB, 4 * MIB + MIB // 2, 64 * MIB])
@pytest.mark.parametrize("max_shard", [5 * MIB, 5_000_000_000])
def test_coverage_hand_built(max_task, max_shard):
    spec = llama_spec(extra={"model.extra.zero": ("F32", (0, 8)), "model.extra.scalar": ("F32", ())})
    sft, aligned = fake_sources(spec, "s", per_file=7), fake_sources(spec, "a", header=1000, per_file=5)
    plan = plan_for(sft, aligned, max_task_bytes=max_task, max_shard_size=max_shard)
    check_coverage(plan, max_task)
    assert [sorted(s.layout.tensors) for s in plan.shards] == [sorted(g) for g in greedy_groups(spec, max_shard)]
    assert len(plan.shards) == 1 if max_shard > 10**9 else len(plan.shards) >= plan.total_size // max_shard + 1
    n_tasks = len(plan.tasks)
    assert n_tasks >= plan.total_size // max(MIB, max_task // MIB * MIB)
    assert plan.total_size == sum(math.prod(s) * itemsize(d) for d, s in spec.values())
    assert plan.bytes_written == sum(s.layout.size for s in plan.shards)
    # every extrapolated element reads both models: 2 + 2 bytes per bf16 element, plus 4 + 4 for the F32 scalar
    assert plan.bytes_read == 2 * plan.total_size


def test_max_task_not_mib_multiple_rounds_down_to_mib():
    spec = llama_spec(layers=1)
    plan = plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"), max_task_bytes=MIB + 12345)
    check_coverage(plan)
    assert max(t.nbytes for t in plan.tasks) <= MIB
    plan = plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"), max_task_bytes=1000)  # below 1 MiB
    check_coverage(plan)
    assert max(t.nbytes for t in plan.tasks) <= MIB


# ---- (b) segment input offsets ----

def check_input_offsets(plan, sft, aligned):
    for t in plan.tasks:
        for seg in t.segments:
            entry = plan_entry(plan, t.file, seg.tensor)
            x0 = (seg.out_offset - entry.begin) // itemsize(entry.dtype)
            a, s = aligned[seg.tensor], sft[seg.tensor]
            assert seg.a_file == a.file and seg.a_dtype == a.dtype
            assert seg.a_offset == a.begin + x0 * itemsize(a.dtype)
            assert seg.a_offset + seg.count * itemsize(a.dtype) <= a.begin + math.prod(a.shape) * itemsize(a.dtype)
            if seg.s_file is not None:
                assert seg.s_file == s.file and seg.s_dtype == s.dtype
                assert seg.s_offset == s.begin + x0 * itemsize(s.dtype)
                assert seg.s_offset + seg.count * itemsize(s.dtype) <= s.begin + math.prod(s.shape) * itemsize(s.dtype)
            else:
                assert seg.op == COPY


def plan_entry(plan, file, name):
    return next(sh.layout.tensors[name] for sh in plan.shards if sh.file == file)


def test_input_offsets_hand_built_mixed_dtypes():
    spec_a = llama_spec(dtype="BF16")
    spec_s = llama_spec(dtype="F32")
    sft, aligned = fake_sources(spec_s, "s", per_file=4), fake_sources(spec_a, "a", header=777 * 8, per_file=6)
    plan = plan_for(sft, aligned, max_task_bytes=MIB, max_shard_size=3 * MIB)
    check_coverage(plan, MIB)
    check_input_offsets(plan, sft, aligned)
    for t in plan.tasks:
        for seg in t.segments:
            assert seg.op == EXTRAPOLATE and seg.out_dtype == "BF16" and seg.s_dtype == "F32" and seg.alpha == 0.3
    # a tensor split over several tasks: its pieces read consecutive input ranges
    name = "model.layers.1.mlp.up_proj.weight"
    segs = sorted((seg for t in plan.tasks for seg in t.segments if seg.tensor == name), key=lambda s: s.out_offset)
    assert len(segs) >= 2
    assert segs[0].a_offset == aligned[name].begin and segs[0].s_offset == sft[name].begin
    for p, q in zip(segs, segs[1:]):
        assert q.a_offset == p.a_offset + 2 * p.count and q.s_offset == p.s_offset + 4 * p.count
    assert sum(s.count for s in segs) == 1024 * 512


def read_elems(path, offset, count, dtype) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, count * itemsize(dtype), offset)
    finally:
        os.close(fd)


def tensor_bytes(folder, name) -> bytes:
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as st:
                if name in st.keys():
                    return st.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    raise KeyError(name)


def sources_of(folder) -> dict[str, TensorRef]:
    idx = index_model(str(folder))
    return dict(idx.tensors), idx.config


@pytest.fixture(scope="module")
def mixed_pair(pair_factory):
    """A sharded bf16 aligned model, its SFT rewritten in float32 as one file, with 3 added vocabulary rows
    and a non-float buffer."""
    sft_dir, al_dir = pair_factory(hidden_size=128, intermediate_size=256, vocab_size=300, extra_vocab=3,
                                   nonfloat_buffer=True, aligned_shard_bytes=50_000, seed=4, private=True)
    sd = load_file(str(sft_dir / "model.safetensors"))
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    save_file(sd, str(sft_dir / "model.safetensors"), metadata={"format": "pt"})
    return sft_dir, al_dir


def test_input_offsets_generated_pair_read_the_right_bytes(mixed_pair):
    sft_dir, al_dir = mixed_pair
    sft, scfg = sources_of(sft_dir)
    aligned, acfg = sources_of(al_dir)
    assert sft["model.norm.weight"].dtype == "F32" and aligned["model.norm.weight"].dtype == "BF16"
    plan = plan_for(sft, aligned, sft_cfg=scfg, aligned_cfg=acfg, max_task_bytes=MIB, max_shard_size=60_000)
    check_coverage(plan, MIB)
    check_input_offsets(plan, sft, aligned)
    cache = {}
    n_ex = n_copy = 0
    for t in plan.tasks:
        for seg in t.segments:
            entry = plan_entry(plan, t.file, seg.tensor)
            x0 = (seg.out_offset - entry.begin) // itemsize(entry.dtype)
            for which, folder, f, off, dt in (("a", al_dir, seg.a_file, seg.a_offset, seg.a_dtype),
                                              ("s", sft_dir, seg.s_file, seg.s_offset, seg.s_dtype)):
                if f is None:
                    continue
                key = (which, seg.tensor)
                if key not in cache:
                    cache[key] = tensor_bytes(folder, seg.tensor)
                size = itemsize(dt)
                want = cache[key][x0 * size:(x0 + seg.count) * size]
                assert read_elems(f, off, seg.count, dt) == want, (which, seg)
            n_ex += seg.op == EXTRAPOLATE
            n_copy += seg.op == COPY
    assert n_ex > 10 and n_copy >= 2  # the extra vocab rows (2 tensors) and the buffer


# ---- (c) vocab extension and mismatches ----

def test_vocab_extension_hand_built():
    spec_s = llama_spec(vocab=3000, layers=1)
    spec_a = llama_spec(vocab=3050, layers=1)
    sft, aligned = fake_sources(spec_s, "s"), fake_sources(spec_a, "a", header=2048)
    plan = plan_for(sft, aligned, max_task_bytes=MIB)
    check_coverage(plan, MIB)
    check_input_offsets(plan, sft, aligned)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        d = plan.decisions[name]
        assert d.op == "vocab-extended" and d.shape == (3050, 512) and d.alpha == 0.3
        assert any(name in w and "50" in w for w in plan.warnings)
        shared = 3000 * 512
        segs = sorted((seg for t in plan.tasks for seg in t.segments if seg.tensor == name),
                      key=lambda s: s.out_offset)
        entry = plan_entry(plan, plan.weight_map()[name], name)
        elem = 0
        for seg in segs:
            x0 = (seg.out_offset - entry.begin) // 2
            assert x0 == elem
            if seg.op == EXTRAPOLATE:
                assert x0 + seg.count <= shared and seg.s_file == sft[name].file
            else:
                assert x0 >= shared and seg.s_file is None and seg.op == COPY
                assert seg.a_offset == aligned[name].begin + 2 * x0
            elem += seg.count
        assert elem == 3050 * 512
        assert sum(s.count for s in segs if s.op == COPY) == 50 * 512
    assert plan.decisions["model.layers.0.mlp.up_proj.weight"].op == EXTRAPOLATE


def test_vocab_extension_generated_pair(mixed_pair):
    sft, scfg = sources_of(mixed_pair[0])
    aligned, acfg = sources_of(mixed_pair[1])
    plan = plan_for(sft, aligned, sft_cfg=scfg, aligned_cfg=acfg)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert plan.decisions[name].op == "vocab-extended" and plan.decisions[name].shape == (303, 128)
        copies = [seg for t in plan.tasks for seg in t.segments if seg.tensor == name and seg.op == COPY]
        assert sum(s.count for s in copies) == 3 * 128 and all(s.s_file is None for s in copies)


def test_aligned_with_fewer_vocab_rows_is_refused():
    sft, aligned = fake_sources(llama_spec(vocab=1000, layers=1), "s"), fake_sources(llama_spec(vocab=990, layers=1), "a")
    with pytest.raises(ExpoError) as ei:
        plan_for(sft, aligned)
    assert "model.embed_tokens.weight" in str(ei.value) and "lm_head.weight" in str(ei.value)


def test_non_vocab_shape_mismatch_is_refused():
    spec_s = llama_spec(layers=2)
    spec_a = dict(spec_s)
    spec_a["model.layers.1.mlp.up_proj.weight"] = ("BF16", (1030, 512))  # more rows, but not a vocab tensor
    with pytest.raises(ExpoError) as ei:
        plan_for(fake_sources(spec_s, "s"), fake_sources(spec_a, "a"))
    msg = str(ei.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "[1024, 512]" in msg and "[1030, 512]" in msg
    assert "model.layers.0" not in msg


def test_vocab_tensor_with_other_column_count_is_refused():
    spec_s = llama_spec(layers=1)
    spec_a = dict(spec_s)
    spec_a["model.embed_tokens.weight"] = ("BF16", (1010, 256))
    with pytest.raises(ExpoError, match=r"model\.embed_tokens\.weight"):
        plan_for(fake_sources(spec_s, "s"), fake_sources(spec_a, "a"))


def test_missing_tensors_are_all_listed():
    spec = llama_spec(layers=3)
    spec_s = {k: v for k, v in spec.items() if k not in ("model.layers.2.mlp.down_proj.weight", "model.norm.weight")}
    spec_a = {k: v for k, v in spec.items() if k != "model.layers.0.self_attn.q_proj.weight"}
    spec_a["model.layers.0.self_attn.q_proj.bias"] = ("BF16", (512,))
    with pytest.raises(ExpoError) as ei:
        plan_for(fake_sources(spec_s, "s"), fake_sources(spec_a, "a"))
    msg = str(ei.value)
    assert "4 tensor(s)" in msg
    assert "model.layers.2.mlp.down_proj.weight (only in aligned)" in msg
    assert "model.norm.weight (only in aligned)" in msg
    assert "model.layers.0.self_attn.q_proj.weight (only in SFT)" in msg
    assert "model.layers.0.self_attn.q_proj.bias (only in aligned)" in msg
    assert "\n" not in msg


# ---- (d) tied embeddings, configs ----

def test_tied_embeddings_drop_lm_head():
    spec = llama_spec(layers=1, tie=False)  # lm_head saved anyway (some checkpoints do)
    cfg = dict(CFG, tie_word_embeddings=True)
    sft, aligned = fake_sources(spec, "s"), fake_sources(spec, "a")
    plan = plan_for(sft, aligned, sft_cfg=cfg, aligned_cfg=cfg, max_task_bytes=MIB)
    assert plan.decisions["lm_head.weight"].op == "dropped-tied"
    assert "lm_head.weight" not in plan.weight_map()
    assert all(seg.tensor != "lm_head.weight" for t in plan.tasks for seg in t.segments)
    assert plan.total_size == sum(math.prod(s) * itemsize(d) for n, (d, s) in spec.items() if n != "lm_head.weight")
    check_coverage(plan, MIB)
    # a truly tied checkpoint (no lm_head at all) plans the same output
    spec2 = llama_spec(layers=1, tie=True)
    plan2 = plan_for(fake_sources(spec2, "s"), fake_sources(spec2, "a"), sft_cfg=cfg, aligned_cfg=cfg,
                     max_task_bytes=MIB)
    assert [s.layout.header for s in plan2.shards] == [s.layout.header for s in plan.shards]
    # untied: lm_head is extrapolated like the rest
    plan3 = plan_for(sft, aligned, max_task_bytes=MIB)
    assert plan3.decisions["lm_head.weight"].op == EXTRAPOLATE and "lm_head.weight" in plan3.weight_map()


def test_tied_generated_pair(pair_factory):
    s_dir, a_dir = pair_factory("tied", seed=5)
    sft, scfg = sources_of(s_dir)
    aligned, acfg = sources_of(a_dir)
    assert "lm_head.weight" not in aligned
    plan = plan_for(sft, aligned, sft_cfg=scfg, aligned_cfg=acfg)
    assert set(plan.weight_map()) == set(aligned)
    check_coverage(plan)


def test_mismatched_tie_flags_refused():
    spec = llama_spec(layers=1)
    with pytest.raises(ExpoError, match="tie_word_embeddings"):
        plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"),
                 sft_cfg=dict(CFG, tie_word_embeddings=False), aligned_cfg=dict(CFG, tie_word_embeddings=True))


@pytest.mark.parametrize("key,value", [("hidden_size", 128), ("model_type", "mistral"),
                                       ("num_hidden_layers", 3), ("architectures", ["MistralForCausalLM"])])
def test_config_architecture_mismatch_refused(key, value):
    spec = llama_spec(layers=1)
    with pytest.raises(ExpoError) as ei:
        plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"), sft_cfg=CFG, aligned_cfg=dict(CFG, **{key: value}))
    msg = str(ei.value)
    assert key in msg and repr(value) in msg and repr(CFG[key]) in msg


def test_config_differences_that_do_not_matter_are_accepted():
    spec = llama_spec(layers=1)
    plan = plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"), sft_cfg=dict(CFG, vocab_size=1000),
                    aligned_cfg=dict(CFG, vocab_size=1003, torch_dtype="bfloat16"))
    assert len(plan.tasks) >= 1
    plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"), sft_cfg={}, aligned_cfg=CFG)  # SFT has no config


# ---- (e) non-float tensors ----

def test_non_float_tensors_copied_with_sft_for_compare():
    extra = {"model.extra_buffer.position_ids": ("I64", (64,)), "model.mask": ("BOOL", (10,)),
             "model.fp8.weight": ("F8_E4M3", (4, 8))}
    spec = llama_spec(layers=1, extra=extra)
    sft, aligned = fake_sources(spec, "s", header=128), fake_sources(spec, "a", header=4096)
    plan = plan_for(sft, aligned)
    check_coverage(plan)
    check_input_offsets(plan, sft, aligned)
    for name in extra:
        assert plan.decisions[name].op == COPY
        segs = [seg for t in plan.tasks for seg in t.segments if seg.tensor == name]
        assert segs and all(seg.op == COPY for seg in segs)
        for seg in segs:
            assert seg.s_file == sft[name].file and seg.s_offset >= sft[name].begin
    for name in spec:
        if name not in extra:
            assert plan.decisions[name].op == EXTRAPOLATE


def test_non_float_shape_or_dtype_mismatch_refused():
    spec_s = llama_spec(layers=1, extra={"model.extra_buffer.position_ids": ("I64", (64,))})
    spec_a = llama_spec(layers=1, extra={"model.extra_buffer.position_ids": ("I64", (65,))})
    with pytest.raises(ExpoError, match=r"model\.extra_buffer\.position_ids"):
        plan_for(fake_sources(spec_s, "s"), fake_sources(spec_a, "a"))
    spec_a = llama_spec(layers=1, extra={"model.extra_buffer.position_ids": ("I32", (64,))})
    with pytest.raises(ExpoError, match=r"model\.extra_buffer\.position_ids"):
        plan_for(fake_sources(spec_s, "s"), fake_sources(spec_a, "a"))


# ---- (f) shard layout ----

def test_shard_layout_greedy_in_natural_order():
    # 12 layers of equal tensors, so natural vs lexicographic order give different groupings
    spec = {f"model.layers.{i}.w": ("BF16", (500,)) for i in range(12)}  # 1000 bytes each
    spec["model.norm.weight"] = ("F32", (250,))  # 1000 bytes
    plan = plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"), max_shard_size=2500)
    names = sorted(spec, key=natural)
    assert names.index("model.layers.2.w") < names.index("model.layers.10.w")
    # independent greedy: two 1000-byte tensors fit in 2500, the third does not
    groups = [names[i:i + 2] for i in range(0, len(names), 2)]
    n = len(groups)
    assert n == 7
    assert [s.file for s in plan.shards] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert [sorted(s.layout.tensors) for s in plan.shards] == [sorted(g) for g in groups]
    wm = plan.weight_map()
    assert wm["model.layers.2.w"] == "model-00002-of-00007.safetensors"
    assert wm["model.layers.10.w"] == "model-00006-of-00007.safetensors"
    check_coverage(plan)


def test_one_shard_is_model_safetensors():
    spec = llama_spec(layers=1)
    plan = plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"))
    assert [s.file for s in plan.shards] == ["model.safetensors"]
    assert set(plan.weight_map().values()) == {"model.safetensors"}


def test_big_tensor_alone_in_its_shard():
    spec = {"a.0": ("BF16", (500,)), "a.1": ("BF16", (5000,)), "a.2": ("BF16", (500,)), "a.3": ("BF16", (500,)),
            "b.0": ("BF16", (6000,))}
    plan = plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"), max_shard_size=2500)
    assert [sorted(s.layout.tensors) for s in plan.shards] == [["a.0"], ["a.1"], ["a.2", "a.3"], ["b.0"]]
    assert [s.file for s in plan.shards][-1] == "model-00004-of-00004.safetensors"
    for s in plan.shards:
        data = s.layout.size - len(s.layout.header)
        assert data <= 2500 or len(s.layout.tensors) == 1


def test_shard_filled_exactly_to_the_limit():
    spec = {f"t.{i}": ("BF16", (500,)) for i in range(5)}  # 1000 bytes each
    plan = plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"), max_shard_size=2000)
    assert [sorted(s.layout.tensors) for s in plan.shards] == [["t.0", "t.1"], ["t.2", "t.3"], ["t.4"]]
    plan = plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"), max_shard_size=1999)
    assert len(plan.shards) == 5


def test_shard_headers_are_valid_safetensors(tmp_path):
    spec = llama_spec(layers=1, extra={"model.extra_buffer.position_ids": ("I64", (64,))})
    plan = plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"), max_shard_size=2 * MIB)
    for sh in plan.shards:
        p = tmp_path / sh.file
        with open(p, "wb") as f:
            f.write(sh.layout.header)
            f.truncate(sh.layout.size)
        with safe_open(str(p), "pt") as st:
            assert st.metadata() == {"format": "pt"}
            for name in st.keys():
                d, shape = spec[name]
                assert tuple(st.get_slice(name).get_shape()) == shape


# ---- (g) determinism ----

@pytest.fixture(scope="module")
def two_shardings(pair_factory):
    kw = dict(hidden_size=256, intermediate_size=512, num_layers=3, vocab_size=1024, nonfloat_buffer=True, seed=8)
    p1 = pair_factory(sft_shard_bytes=700_000, aligned_shard_bytes=300_000, **kw)
    p2 = pair_factory(sft_shard_bytes=None, aligned_shard_bytes=1_100_000, **kw)
    return p1, p2


@pytest.mark.parametrize("max_task,max_shard", [(MIB, 2_000_000), (2 * MIB, 5_000_000_000)])
def test_plan_independent_of_input_sharding(two_shardings, max_task, max_shard):
    plans = []
    for s_dir, a_dir in two_shardings:
        sft, scfg = sources_of(s_dir)
        aligned, acfg = sources_of(a_dir)
        plans.append(plan_for(sft, aligned, sft_cfg=scfg, aligned_cfg=acfg,
                              max_task_bytes=max_task, max_shard_size=max_shard))
    files = [len({s.a_file for t in p.tasks for s in t.segments}) for p in plans]
    assert files[0] != files[1]  # the inputs really are laid out differently
    p1, p2 = plans
    assert [(s.file, s.layout.header, s.layout.size) for s in p1.shards] == \
           [(s.file, s.layout.header, s.layout.size) for s in p2.shards]
    assert [(t.file, t.begin, t.end) for t in p1.tasks] == [(t.file, t.begin, t.end) for t in p2.tasks]
    def strip(p):
        return [[(g.op, g.tensor, g.out_offset, g.count, g.out_dtype, g.s_file is None) for g in t.segments]
                for t in p.tasks]
    assert strip(p1) == strip(p2)
    assert len(p1.tasks) > len(p1.shards)  # several tasks per shard somewhere
    check_coverage(p1, max_task)
    # and a plan is a pure function of its inputs
    s_dir, a_dir = two_shardings[0]
    sft, scfg = sources_of(s_dir)
    aligned, acfg = sources_of(a_dir)
    again = plan_for(sft, aligned, sft_cfg=scfg, aligned_cfg=acfg, max_task_bytes=max_task, max_shard_size=max_shard)
    assert again.tasks == p1.tasks and [s.layout for s in again.shards] == [s.layout for s in p1.shards]


def test_plan_independent_of_source_dict_order():
    spec = llama_spec(layers=2)
    sft, aligned = fake_sources(spec, "s"), fake_sources(spec, "a")
    p1 = plan_for(sft, aligned, max_task_bytes=MIB, max_shard_size=3 * MIB)
    p2 = plan_for(dict(reversed(list(sft.items()))), dict(sorted(aligned.items())), max_task_bytes=MIB,
                  max_shard_size=3 * MIB)
    assert p1.tasks == p2.tasks and [s.layout.header for s in p1.shards] == [s.layout.header for s in p2.shards]


def test_alpha_for_is_per_tensor():
    spec = llama_spec(layers=1)
    plan = make_plan(fake_sources(spec, "s"), fake_sources(spec, "a"),
                     alpha_for=lambda n: 0.5 if "mlp" in n else 0.1, sft_config=CFG, aligned_config=CFG)
    for t in plan.tasks:
        for seg in t.segments:
            assert seg.alpha == (0.5 if "mlp" in seg.tensor else 0.1)


# ---- (h) parse_size ----

@pytest.mark.parametrize("text,value", [
    ("5GB", 5 * 10**9), ("5gb", 5 * 10**9), ("64MiB", 64 * 2**20), ("64mib", 64 * 2**20), (1000, 1000),
    ("1000", 1000), ("1000B", 1000), ("10KB", 10_000), ("10KiB", 10_240), ("1.5GiB", 3 * 2**29),
    (" 2 TB ", 2 * 10**12), ("256MB", 256 * 10**6), ("1TiB", 2**40), ("0.5MiB", 2**19),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["abc", "5XB", "", "GB", "-1GB", "5 G B", "1e9", "5GBs"])
def test_parse_size_refuses(text):
    with pytest.raises(ExpoError) as ei:
        parse_size(text)
    assert repr(text) in str(ei.value)


# ---- (e) models with nothing to merge, config types ----


def test_zero_tensor_model_refused_at_plan(tmp_path):
    spec = fake_sources(llama_spec(layers=1), "x")
    with pytest.raises(ExpoError, match="SFT model holds no tensors") as ei:
        plan_for({}, spec)
    assert "\n" not in str(ei.value)
    with pytest.raises(ExpoError, match="aligned model holds no tensors"):
        plan_for(spec, {})
    only_head = fake_sources({"lm_head.weight": ("BF16", (1000, 512))}, "h")
    tied = dict(CFG, tie_word_embeddings=True)
    with pytest.raises(ExpoError, match="no tensor is left"):
        plan_for(only_head, only_head, sft_cfg=tied, aligned_cfg=tied)
    # a real folder whose model.safetensors holds no tensors: refused while indexing, naming the folder
    empty = tmp_path / "empty"
    empty.mkdir()
    save_file({}, str(empty / "model.safetensors"))
    with pytest.raises(ExpoError) as ei:
        index_model(str(empty))
    assert str(empty) in str(ei.value) and "no tensors" in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("value", ["false", "yes", 1, 0, [True], {"x": 1}])
def test_tie_word_embeddings_must_be_a_boolean(value):
    spec = fake_sources(llama_spec(layers=1), "x")
    with pytest.raises(ExpoError, match="tie_word_embeddings is") as ei:
        plan_for(spec, spec, sft_cfg=CFG, aligned_cfg=dict(CFG, tie_word_embeddings=value))
    assert "\n" not in str(ei.value)
    plan_for(spec, spec, sft_cfg=dict(CFG, tie_word_embeddings=None), aligned_cfg=CFG)  # null: not set


def test_names_with_huge_digit_runs_are_ordered_without_int():
    """natural_key compares digit runs by value without int(): 5000 digits would pass Python's int-string limit."""
    names = ["layers.10.w", "layers.9.w", "layers." + "9" * 5000 + ".w", "layers.010.w", "x1\u00b2", "layers.2.w"]
    assert sorted(names, key=natural_key)[:4] == ["layers.2.w", "layers.9.w", "layers.10.w", "layers.010.w"]
    spec = {n: ("BF16", (4,)) for n in names}
    plan = plan_for(fake_sources(spec, "s"), fake_sources(spec, "a"))
    assert set(plan.weight_map()) == set(names)
