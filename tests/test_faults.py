"""Faults on a real 3-node Ray cluster (ray.cluster_utils.Cluster on this machine).

A worker process killed mid-task and a node removed mid-merge: the merge finishes on the workers left
(and replacements), the output is byte-identical to an undisturbed merge, and the manifest shows the reruns.
A task that kills its worker every time: the merge fails after --max-attempts runs with a line naming the
task and the last error, leaves nothing that looks complete, and the same command then resumes.

Faults are injected with the test-only hooks of tests/faulthooks.py (EXPO_TEST_HOOKS names them; the driver puts
them in the Settings every worker gets): EXPO_TEST_FAULTS names a JSON file, re-read before every task, with a
per-task delay (so there is a "mid-merge" to hit) and task ids whose worker exits at once.
"""

import json
import os
import signal

import faulthooks
import pytest
from clusters import three_node_cluster
from faultwait import finish, in_thread, merge_workers, wait_for

from expo_dist.cli import main
from expo_dist.merge import run
from expo_dist.spec import MergeSpec
from expo_dist.testing.reference import assert_same

ALPHA = 0.4
SETTINGS = dict(max_shard_size="3MB", max_task_bytes="1MiB")
COMPLETE = ("model.safetensors.index.json", "model.safetensors", "expo_manifest.json")


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "faults.json"
    path.write_text("{}")

    def set_faults(**kw):
        path.write_text(json.dumps(kw))

    set_faults.path = path
    return set_faults


@pytest.fixture(scope="module")
def cluster(faults):
    hooks = faulthooks.env(faults=faults.path)
    # the faults file: in the nodes' environment (their workers read it); the hooks: in the driver's (this process
    # builds each merge's Settings, here and in main())
    with three_node_cluster({faulthooks.FAULTS_ENV: hooks.pop(faulthooks.FAULTS_ENV)}) as c, \
            pytest.MonkeyPatch.context() as mp:
        for k, v in hooks.items():
            mp.setenv(k, v)
        yield c


@pytest.fixture(scope="module")
def pair(pair_factory):
    return pair_factory("small", num_layers=6, seed=9)


def spec(pair, out, **kw):
    return MergeSpec(sft=str(pair[0]), aligned=str(pair[1]), alpha=ALPHA, out=str(out), **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def baseline(cluster, pair, faults, tmp_path_factory):
    faults()
    out = tmp_path_factory.mktemp("base") / "out"
    m = run(spec(pair, out), progress=False)
    assert m["task_attempts"] == m["tasks"] >= 12
    return out




def journal_lines(out):
    try:
        with open(out / ".expo" / "journal.jsonl") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def test_worker_killed_mid_task(cluster, pair, baseline, faults, tmp_path):
    """One worker, killed while it runs a task: only its replacement can finish the merge."""
    faults(delay=0.3)
    out = tmp_path / "out"
    box = in_thread(lambda: run(spec(pair, out, workers=1), progress=False))
    wait_for(lambda: journal_lines(out) >= 2, what="the first tasks")
    wait_for(lambda: merge_workers(busy=True), what="a busy worker")
    victim = merge_workers(busy=True)[0].pid
    os.kill(victim, signal.SIGKILL)
    m = finish(box)
    # the task it was running ran twice; the one queued behind it never started, so it counts once
    assert m["task_attempts"] == m["tasks"] + 1
    dead = [w for w in m["workers"] if w.get("died")]
    assert [w["pid"] for w in dead] == [victim], m["workers"]
    assert "ActorDiedError" in dead[0]["died"]
    assert len(m["workers"]) == 2 and m["workers"][1]["tasks"] > 0  # the replacement did the rest
    assert sum(w["tasks"] for w in m["workers"]) == m["tasks"]
    assert_same(out, baseline)


def test_task_that_keeps_killing_its_worker_fails_after_max_attempts(cluster, pair, baseline, faults, tmp_path,
                                                                        capsys):
    out = tmp_path / "out"
    argv = ["merge", "--sft", str(pair[0]), "--aligned", str(pair[1]), "--alpha", str(ALPHA), "--out", str(out),
            "--max-shard-size", SETTINGS["max_shard_size"], "--max-task-bytes", SETTINGS["max_task_bytes"],
            "--max-attempts", "3", "-q", "--json"]
    faults(crash=[5])
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("expo-dist: error: task 5 (model-"), err
    assert "failed 3 times (--max-attempts 3); last error: worker pid" in last and "died" in last
    assert not any((out / f).exists() for f in COMPLETE)
    faults()
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    summary = json.loads(cap.out)
    assert 0 < summary["tasks_resumed"] < summary["tasks"]
    assert_same(out, baseline)


def test_node_removed_mid_merge(cluster, pair, baseline, faults, tmp_path):
    """Runs last: the cluster is down to two nodes afterwards (one is added back)."""
    from ray._private import ray_constants

    faults(delay=0.4)
    out = tmp_path / "out"
    box = in_thread(lambda: run(spec(pair, out), progress=False))
    wait_for(lambda: journal_lines(out) >= 2, what="the first tasks")

    def busy_node():
        for node in cluster.worker_nodes:
            raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
            if merge_workers(raylet, busy=True):
                return node
        return None

    wait_for(busy_node, what="a worker node with a busy worker")
    node = busy_node()
    lost = {p.pid for p in merge_workers(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)}
    cluster.remove_node(node)
    try:
        m = finish(box)
    finally:
        cluster.add_node(num_cpus=1)
    assert m["task_attempts"] > m["tasks"]
    dead = {w["pid"] for w in m["workers"] if w.get("died")}
    assert dead == lost, m["workers"]
    assert sum(w["tasks"] for w in m["workers"]) == m["tasks"]  # each task finished once, the rest elsewhere
    assert_same(out, baseline)
