"""The pipelined task runner on its own (no Ray): windows, slots, odd chunk sizes, mixed dtypes."""

import os

import pytest

from expo_dist.merge import build_plan
from expo_dist.output.finalize import create_shards
from expo_dist.planning.plan import COPY
from expo_dist.planning.windows import windows
from expo_dist.runtime.runner import Runner
from expo_dist.settings import Settings
from expo_dist.spec import MergeSpec
from expo_dist.testing.reference import assert_exact


@pytest.fixture(scope="module")
def plan_and_pair(pair_factory, tmp_path_factory):
    sft, aligned = pair_factory(hidden_size=128, intermediate_size=320, num_layers=2, vocab_size=1000,
                                extra_vocab=5, nonfloat_buffer=True, sft_shard_bytes=400_000,
                                aligned_shard_bytes=300_000, seed=2)
    out = tmp_path_factory.mktemp("exe") / "o"
    spec = MergeSpec(sft=str(sft), aligned=str(aligned), alpha=0.25, out=str(out), max_shard_size="600KB").validate()
    plan, _, _ = build_plan(spec)
    return plan, sft, aligned


def test_windows_tile_each_task_exactly(plan_and_pair):
    plan = plan_and_pair[0]
    for chunk in (64, 1000, 4096, 1 << 20):
        for task in plan.tasks:
            wins = windows(task, chunk)
            assert wins[0].pos == task.begin
            for w0, w1 in zip(wins, wins[1:]):
                assert w1.pos == w0.pos + w0.nbytes
            assert wins[-1].pos + wins[-1].nbytes == task.end
            for w in wins:
                assert 0 < w.nbytes <= max(chunk, 8)
                at = 0
                for p in w.pieces:
                    assert p.out_at == at
                    assert p.seg.out_offset + p.first * (p.seg.out_bytes // p.seg.count) == w.pos + at
                    at += p.count * (p.seg.out_bytes // p.seg.count)
                assert at == w.nbytes
            # every element of every segment is in exactly one piece
            for seg in task.segments:
                got = sorted((p.first, p.count) for w in wins for p in w.pieces if p.seg is seg)
                pos = 0
                for first, count in got:
                    assert first == pos
                    pos += count
                assert pos == seg.count


@pytest.mark.parametrize("chunk", [4096, 1000 * 8, 1 << 20])
def test_runner_output_exact_for_any_chunk(plan_and_pair, tmp_path, chunk):
    plan, sft, aligned = plan_and_pair
    create_shards(plan, str(tmp_path))
    runner = Runner(str(tmp_path), chunk_bytes=chunk)
    differs = set()
    for task in plan.tasks:
        res = runner.run(task)
        differs.update(res.differs)
        assert res.nbytes == task.nbytes
    runner.close()
    assert not differs  # the generator's int64 buffer is equal in both models
    assert any(s.op == COPY for t in plan.tasks for s in t.segments)
    # lay the staged shards out as a model folder and compare with the float64 reference
    if len(plan.shards) > 1:
        import json

        index = {"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map()}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_exact(str(tmp_path), str(sft), str(aligned), 0.25, tie=False)


def test_runner_reports_nonfloat_difference(pair_factory, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    sft, aligned = pair_factory(nonfloat_buffer=True, seed=4, private=True)
    path = os.path.join(aligned, "model.safetensors")
    sd = load_file(path)
    sd["model.extra_buffer.position_ids"] = sd["model.extra_buffer.position_ids"] + 1
    save_file(sd, path, metadata={"format": "pt"})
    plan, _, _ = build_plan(MergeSpec(sft=str(sft), aligned=str(aligned), alpha=0.5, out=str(tmp_path / "o")).validate())
    create_shards(plan, str(tmp_path / "w"))
    runner = Runner(str(tmp_path / "w"), chunk_bytes=4096)
    differs = set()
    for task in plan.tasks:
        differs.update(runner.run(task).differs)
    assert differs == {"model.extra_buffer.position_ids"}
    out = load_file(str(tmp_path / "w" / "model.safetensors"))
    assert torch.equal(out["model.extra_buffer.position_ids"], sd["model.extra_buffer.position_ids"])


@pytest.mark.parametrize("chunk", [4096, 1000 * 8, 3 * 4096 + 8, 1 << 20])
def test_direct_and_page_cache_io_give_the_same_bytes(plan_and_pair, tmp_path, monkeypatch, chunk):
    """Direct I/O (whole blocks straight to and from the disk, partial blocks through the page cache, buffers
    placed so each byte's address matches its file offset modulo the block) writes exactly the bytes the
    page-cache path writes, for window sizes that do and do not fall on block boundaries."""
    from expo_dist.runtime.fileio import ALIGN

    plan, sft, aligned = plan_and_pair
    outs = {}
    for mode in ("direct", "buffered"):
        out = tmp_path / mode
        evict(sft, aligned)  # inputs the page cache holds are read from there (next test)
        runner = run_all(plan, out, chunk_bytes=chunk, direct_min=0, settings=Settings(io=mode))
        io = runner.io
        # every input byte the plan reads (plus the SFT side of copied non-float tensors, read to compare)
        assert plan.bytes_read <= io["direct_read"] + io["cached_read"] <= plan.bytes_read + 4096
        assert io["direct_write"] + io["cached_write"] == sum(t.nbytes for t in plan.tasks)
        if mode == "buffered" or runner.no_direct:  # a file system without O_DIRECT: all through the cache
            assert io["direct_read"] == io["direct_write"] == 0
        else:
            assert io["direct_read"] > 0.9 * plan.bytes_read, io
            assert io["direct_write"] % ALIGN == 0
            if chunk >= 2 * ALIGN:  # windows end on block boundaries: most blocks are whole in one window
                assert io["direct_write"] > 0.5 * io["cached_write"], io
        outs[mode] = {s.file: (out / s.file).read_bytes() for s in plan.shards}
    assert outs["direct"] == outs["buffered"]
    assert_exact_folder(tmp_path / "direct", plan, sft, aligned)


def run_all(plan, out, **kw) -> Runner:
    """Stage the shards in out and run every task of the plan there with one Runner; the closed Runner."""
    create_shards(plan, str(out))
    runner = Runner(str(out), **kw)
    for task in plan.tasks:
        runner.run(task)
    runner.close()
    return runner


def evict(*folders):
    """Drop these files' pages from the page cache (written back first, so they can be dropped)."""
    for folder in folders:
        for f in os.listdir(folder):
            fd = os.open(os.path.join(folder, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def test_direct_reads_take_what_the_page_cache_holds(plan_and_pair, tmp_path, monkeypatch):
    """With direct I/O on, input pages already in the page cache (a file just downloaded, or read a moment
    ago) are read from the cache, found with mincore (no disk read to find out); the rest from the disk."""
    from expo_dist.runtime.fileio import resident_prefix

    plan, sft, aligned = plan_and_pair
    direct = Settings(io="direct")
    evict(sft, aligned)
    first = sorted(f for f in os.listdir(aligned) if f.endswith(".safetensors"))[0]
    fd = os.open(os.path.join(aligned, first), os.O_RDONLY)
    try:
        assert resident_prefix(fd, 0, 1 << 16) == 0
        os.pread(fd, 1 << 16, 0)  # now its first 64 KiB are in the cache
        assert resident_prefix(fd, 0, 1 << 16) >= 1 << 16
    finally:
        os.close(fd)
    out = tmp_path / "hot"
    runner = run_all(plan, out, chunk_bytes=1 << 20, direct_min=0, settings=direct)
    if runner.no_direct:
        pytest.skip("this file system refuses O_DIRECT")
    total = runner.io["cached_read"] + runner.io["direct_read"]
    assert 0 < runner.io["cached_read"] < 0.5 * total, runner.io  # the cached 64 KiB (and whatever it pulled in)
    hot = {s.file: (out / s.file).read_bytes() for s in plan.shards}
    # direct reads leave the cache as it was; read every input through it, and then all of it comes from there
    for folder in (sft, aligned):
        for f in os.listdir(folder):
            (folder / f).read_bytes()
    out2 = tmp_path / "all-hot"
    runner = run_all(plan, out2, chunk_bytes=1 << 20, direct_min=0, settings=direct)
    assert runner.io["direct_read"] == 0 and runner.io["cached_read"] == total, runner.io
    assert {s.file: (out2 / s.file).read_bytes() for s in plan.shards} == hot
    evict(out)
    assert_exact_folder(out, plan, sft, aligned)


def assert_exact_folder(out, plan, sft, aligned):
    if len(plan.shards) > 1:
        import json

        index = {"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map()}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_exact(str(out), str(sft), str(aligned), 0.25, tie=False)


def test_torch_path_writes_the_same_bytes_as_the_c_path(plan_and_pair, tmp_path, monkeypatch):
    """A CPU worker with the C kernel never imports torch (raw bytes in numpy buffers); without it (or with
    Settings.kernel "torch", i.e. EXPO_KERNEL=torch, or on a GPU) the same windows go through torch ops: same bytes."""
    from expo_dist.runtime import ckernel

    plan = plan_and_pair[0]
    if not ckernel.available():
        pytest.skip("C kernel not built in this install")
    outs = {}
    for mode in ("", "torch"):
        out = tmp_path / (mode or "c")
        assert run_all(plan, out, chunk_bytes=64 << 10, settings=Settings(kernel=mode)).c_path == (mode == "")
        outs[mode] = {s.file: (out / s.file).read_bytes() for s in plan.shards}
    assert outs[""] == outs["torch"]
