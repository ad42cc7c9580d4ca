"""slurm/expo_merge.sbatch on a real 2-node Slurm (`bash .ci/slurm_up.sh`: two slurmd on this host).

Skipped when Slurm is not up. Each test is a real `sbatch` job: Ray head + worker started by the
script, the merge run by `expo-dist`, Ray stopped by the script's trap.
"""

from __future__ import annotations

import os
import subprocess

import faulthooks
import pytest
from cluster_conftest import (
    ALPHA,
    SBATCH,
    SEED,
    SPLIT_ARGS,
    assert_exact_output,
    dump,
    job_state,
    looks_complete,
    manifest_workers,
    processes_of,
    slurm_env,
    slurm_skip_reason,
    wait_until,
)

pytestmark = pytest.mark.skipif(slurm_skip_reason() is not None, reason=str(slurm_skip_reason()))

RAY_TMP = "/tmp/expo-ray-{}"  # the script's default per-job Ray temp dir


@pytest.fixture(scope="module")
def pair(pair_factory):
    return pair_factory("small", seed=SEED)


def test_sbatch_merges_on_two_ray_nodes_exactly(pair, tmp_path, ray_tmp_cleanup):
    sft, aligned = pair
    out, log = tmp_path / "out", tmp_path / "job.log"
    r = subprocess.run(["sbatch", "--wait", "--parsable", "--nodes=2", "--job-name=expo-test", "-o", str(log),
                        str(SBATCH), "merge", "--sft", str(sft), "--aligned", str(aligned), "--alpha", str(ALPHA),
                        "--out", str(out), *SPLIT_ARGS],
                       cwd=tmp_path, env=slurm_env(), capture_output=True, text=True, timeout=600)
    job = r.stdout.strip().split(";")[0]
    ray_tmp_cleanup.append(RAY_TMP.format(job))
    assert r.returncode == 0, f"sbatch exit {r.returncode}\n{r.stderr}\n--- job log ---\n{dump(log)}"
    assert job_state(job) in ("COMPLETED", ""), job_state(job)

    workers = manifest_workers(out)
    busy = {w["node_id"] for w in workers if w["tasks"] > 0}
    assert len(busy) >= 2, f"want both Ray nodes to merge, got {workers}"
    assert_exact_output(out, sft, aligned)

    # the trap stopped Ray and removed its temp dirs
    left = wait_until(lambda: not processes_of(slurm_job=job, markers=(RAY_TMP.format(job) + "/",)), 30)
    assert left, processes_of(slurm_job=job, markers=(RAY_TMP.format(job) + "/",))
    assert not os.path.exists(RAY_TMP.format(job)), os.listdir(RAY_TMP.format(job))


def test_two_jobs_on_the_same_nodes_do_not_collide(pair, tmp_path, ray_tmp_cleanup):
    """Two merges at once on the same two nodes (here: the same host): own ports, temp dirs, tokens."""
    sft, aligned = pair
    procs = []
    for k in (1, 2):
        cmd = ["sbatch", "--wait", "--parsable", "--nodes=2", "-o", str(tmp_path / f"job{k}.log"), str(SBATCH),
               "merge", "--sft", str(sft), "--aligned", str(aligned), "--alpha", str(ALPHA),
               "--out", str(tmp_path / f"out{k}"), *SPLIT_ARGS]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=slurm_env(), stdout=subprocess.PIPE, text=True))
    for k, proc in enumerate(procs, 1):
        out, _ = proc.communicate(timeout=600)
        ray_tmp_cleanup.append(RAY_TMP.format(out.strip().split(";")[0]))
        assert proc.returncode == 0, dump(tmp_path / f"job{k}.log")
    a, b = tmp_path / "out1", tmp_path / "out2"
    shards = sorted(f.name for f in a.glob("model*.safetensors*"))
    assert shards and shards == sorted(f.name for f in b.glob("model*.safetensors*"))
    for name in shards:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert_exact_output(a, sft, aligned)


def test_sbatch_passes_on_the_merge_exit_code(tmp_path, ray_tmp_cleanup):
    log = tmp_path / "job.log"
    r = subprocess.run(["sbatch", "--wait", "--parsable", "--nodes=2", "-o", str(log), str(SBATCH), "merge",
                        "--sft", str(tmp_path / "missing-sft"), "--aligned", str(tmp_path / "missing-aligned"),
                        "--alpha", str(ALPHA), "--out", str(tmp_path / "out")],
                       cwd=tmp_path, env=slurm_env(), capture_output=True, text=True, timeout=600)
    job = r.stdout.strip().split(";")[0]
    ray_tmp_cleanup.append(RAY_TMP.format(job))
    assert r.returncode != 0, dump(log)
    assert "merge exited with" in dump(log), dump(log)
    assert wait_until(lambda: not processes_of(slurm_job=job), 30), processes_of(slurm_job=job)


def test_scancel_stops_ray_and_leaves_no_complete_output(pair, tmp_path, ray_tmp_cleanup):
    sft, aligned = pair
    out, log = tmp_path / "out", tmp_path / "job.log"
    # tests/faulthooks.py (test-only hooks, named by EXPO_TEST_HOOKS): each task sleeps 3 s, so with ~10 tasks
    # on 2 workers the merge runs ≥ 15 s. A bigger pair would only be slow to generate on 2 cores.
    r = subprocess.run(["sbatch", "--parsable", "--nodes=2", "-o", str(log), str(SBATCH), "merge",
                        "--sft", str(sft), "--aligned", str(aligned), "--alpha", str(ALPHA), "--out", str(out),
                        *SPLIT_ARGS],
                       cwd=tmp_path, env=slurm_env(**faulthooks.env(delay=3)), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    ray_tmp_cleanup.append(RAY_TMP.format(job))
    try:
        started = wait_until(lambda: "running: " in dump(log) or job_state(job) not in ("PENDING", "RUNNING"), 180)
        assert started and job_state(job) == "RUNNING", f"{job_state(job)}\n{dump(log)}"
        # mid-merge: the workers have taken tasks (a partial output tree exists)
        assert wait_until(lambda: out.exists() and any(out.iterdir()), 60), dump(log)
        ray_procs = processes_of(slurm_job=job)
        assert len(ray_procs) >= 4, ray_procs  # positive control: we can see the job's Ray processes
        assert not looks_complete(out)
    finally:
        subprocess.run(["scancel", job], timeout=30)

    gone = wait_until(lambda: job_state(job) in ("CANCELLED", "COMPLETED", "FAILED", ""), 120)
    assert gone and job_state(job) in ("CANCELLED", ""), f"{job_state(job)}\n{dump(log)}"
    assert wait_until(lambda: not processes_of(slurm_job=job, markers=(RAY_TMP.format(job) + "/",)), 60), \
        processes_of(slurm_job=job, markers=(RAY_TMP.format(job) + "/",))
    assert "SIGTERM" in dump(log), dump(log)  # the script's trap ran (it stops Ray)
    assert not looks_complete(out), sorted(os.listdir(out))
