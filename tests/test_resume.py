"""Resume: the driver SIGKILLed mid-merge, then the same command again.

OUT/.expo/ holds plan.json (the plan's fingerprint) and journal.jsonl (finished tasks with their CRC-32). A rerun
of the same command keeps the finished tasks whose bytes still check out, redoes the rest, and writes output
byte-identical to an undisturbed merge. A different plan in the same folder is refused unless --overwrite.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import faulthooks
import psutil
import pytest

from expo_dist.cli import main
from expo_dist.merge import run
from expo_dist.output.journal import Journal
from expo_dist.spec import MergeSpec
from expo_dist.testing.reference import assert_same, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHA = 0.3
SETTINGS = ["--max-task-bytes", "1MiB", "--max-shard-size", "8MB", "--workers", "2"]
COMPLETE = ("model.safetensors.index.json", "model.safetensors", "expo_manifest.json")
SHAPE = dict(hidden_size=512, intermediate_size=1536, num_layers=2, num_heads=8, num_kv_heads=4, vocab_size=3000,
             sft_shard_bytes=7_000_000, aligned_shard_bytes=5_000_000)




@pytest.fixture(scope="module")
def pair(pair_factory):
    return pair_factory("mid", seed=11)


@pytest.fixture(scope="module")
def baseline(local_ray, pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "out"
    m = run(MergeSpec(sft=str(pair[0]), aligned=str(pair[1]), alpha=ALPHA, out=str(out), max_task_bytes="1MiB",
                      max_shard_size="8MB", workers=2), progress=False)
    assert m["tasks"] >= 15
    return out


def argv(pair, out, *extra, alpha=ALPHA):
    return ["merge", "--sft", str(pair[0]), "--aligned", str(pair[1]), "--alpha", str(alpha), "--out", str(out),
            *SETTINGS, "-q", "--json", *extra]




def journal_tasks(out):
    try:
        return Journal(str(out / ".expo")).entries()
    except FileNotFoundError:
        return {}


def alive(procs):
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def start_mid_merge(pair, out):
    """`expo-dist merge` as a subprocess (its own embedded Ray), returned once 5 tasks are journaled, with the
    processes it started."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(faulthooks.env(delay=0.3))  # test-only: each task takes >= 0.3 s, so there is a "mid-merge"
    p = subprocess.Popen([sys.executable, "-m", "expo_dist.cli", *argv(pair, out)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.monotonic()
    while len(journal_tasks(out)) < 5:
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < 120, "the merge did not get going"
        time.sleep(0.05)
    return p, psutil.Process(p.pid).children(recursive=True)


@pytest.fixture(scope="module")
def killed(pair, tmp_path_factory):
    """`expo-dist merge` as a subprocess (its own embedded Ray), SIGKILLed once some tasks are journaled.

    Returns (out, journal entries at the kill, Ray processes that outlived the driver by 5 s)."""
    out = tmp_path_factory.mktemp("killed") / "out"
    p, ray_procs = start_mid_merge(pair, out)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    entries = journal_tasks(out)
    # the workers must die with the driver: a worker that lived on would keep writing into OUT
    t0 = time.monotonic()
    while any(p.name().startswith("ray::MergeWorker") for p in alive(ray_procs)):
        assert time.monotonic() - t0 < 30, [p.name() for p in alive(ray_procs)]
        time.sleep(0.2)
    time.sleep(5)
    lingering = [(p.pid, p.name()) for p in alive(ray_procs)]
    for p in alive(ray_procs):  # clean up what Ray left (by PID: only what this driver started)
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if lingering:
        print(f"Ray processes that outlived the SIGKILLed driver by 5 s (killed by the test): {lingering}")
    return out, entries, lingering


def test_killed_driver_leaves_nothing_that_looks_complete(killed):
    out, entries, _ = killed
    assert not any((out / f).exists() for f in COMPLETE)
    assert (out / ".expo" / "plan.json").exists() and len(entries) >= 5


def test_killed_driver_leaves_no_worker(killed):
    """Workers and raylet die with the driver (checked in the fixture); at most Ray's agents linger a while."""
    _, _, lingering = killed
    assert not [name for _, name in lingering if "MergeWorker" in name or name in ("raylet", "gcs_server")]


def test_sigterm_stops_cleanly_and_the_rerun_resumes(pair, baseline, tmp_path):
    """SIGTERM (scancel, kill, a pre-empted node): one line, exit 143, Ray stopped with every process it had
    (nothing left to linger, unlike after SIGKILL), nothing complete-looking, and the rerun resumes."""
    out = tmp_path / "out"
    p, ray_procs = start_mid_merge(pair, out)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    stopped = time.monotonic() - t0
    assert p.returncode == 143, stderr
    assert "Traceback" not in stderr and stdout == "", stderr
    assert stderr.strip().splitlines()[-1].startswith("expo-dist: terminated"), stderr
    left = alive(ray_procs)
    for q in left:
        q.kill()
    assert not left, [q.name() for q in left]
    assert stopped < 30, stopped
    assert not any((out / f).exists() for f in COMPLETE)
    entries = journal_tasks(out)
    assert len(entries) >= 5
    check_rerun(pair, out, entries, baseline)


def check_rerun(pair, out, entries, baseline):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *faulthooks.env(delay=0))}
    r = subprocess.run([sys.executable, "-m", "expo_dist.cli", *argv(pair, out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming the unfinished merge" in r.stderr
    summary = json.loads(r.stdout)
    assert summary["tasks_resumed"] == len(entries)
    manifest = json.loads((out / "expo_manifest.json").read_text())
    assert manifest["task_attempts"] == manifest["tasks"] - len(entries)  # only the unfinished ones redone
    assert_same(out, baseline)
    assert not (out / ".expo").exists()


def test_rerun_resumes_and_is_byte_identical(killed, baseline, pair, tmp_path):
    src, entries, _ = killed
    out = tmp_path / "out"
    shutil.copytree(src, out)  # keep the killed state for the other tests
    check_rerun(pair, out, entries, baseline)


def test_rerun_redoes_a_journaled_task_whose_bytes_changed(local_ray, killed, baseline, pair, tmp_path, capsys):
    """The journal is trusted only where the bytes still match its CRC-32; a torn last line is ignored."""
    src, entries, _ = killed
    out = tmp_path / "out"
    shutil.copytree(src, out)
    lines = [json.loads(x) for x in (out / ".expo" / "journal.jsonl").read_text().splitlines() if x.strip()]
    victim = lines[0]
    with open(out / ".expo" / victim["file"], "r+b") as f:
        f.seek(victim["begin"] + 100)
        b = f.read(1)
        f.seek(victim["begin"] + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    with open(out / ".expo" / "journal.jsonl", "a") as f:
        f.write('{"task": 999, "file": "x", "crc')  # a crash in the middle of a line
    assert main(argv(pair, out)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks_resumed"] == len(entries) - 1
    assert_same(out, baseline)


def test_torn_journal_line_does_not_swallow_the_next_record(tmp_path):
    j = Journal(str(tmp_path))
    j.start("fp")
    (tmp_path / "journal.jsonl").write_text('{"task": 1, "crc32": 5}\n{"task": 2, "cr')

    class T:
        id, file, begin, end = 3, "f", 0, 1

    class R:
        crc32s = [7, 9]  # one CRC per output (two with an alpha sweep)

    j.record(T, R)
    j.close()
    assert j.entries() == {1: [5], 3: [7, 9]}


def test_other_plan_refused_then_overwrite(local_ray, killed, pair, pair_factory, tmp_path, capsys):
    src, _, _ = killed
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = {p: p.read_bytes() for p in (out / ".expo").iterdir() if p.name != "lock"}  # the lock names its holder
    other = pair_factory("mid", seed=12)  # same architecture, other weights
    for args in (argv(pair, out, alpha=0.5), argv(other, out), argv(pair, out, "--max-shard-size", "6MB")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (f"expo-dist: error: --out {out} holds an unfinished merge of different inputs or "
                           "settings; rerun with --overwrite to discard it")
        assert {p: p.read_bytes() for p in (out / ".expo").iterdir() if p.name != "lock"} == before  # untouched
    assert main(argv(pair, out, "--overwrite", alpha=0.5)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks_resumed"] == 0
    man = json.loads((out / "expo_manifest.json").read_text())
    assert man["alpha"] == 0.5 and man["task_attempts"] == man["tasks"]


def test_finished_output_is_not_merged_over(baseline, pair, capsys):
    before = {f: (baseline / f).read_bytes() for f in weights(baseline)}
    assert main(argv(pair, baseline)) == 2
    assert "is not empty; choose an empty folder or pass --overwrite" in capsys.readouterr().err
    assert {f: (baseline / f).read_bytes() for f in weights(baseline)} == before
