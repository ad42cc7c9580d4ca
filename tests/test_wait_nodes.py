"""`expo-dist merge --wait-nodes N`: after joining the cluster, wait until N Ray nodes are alive (what the sbatch
needs while its other nodes still run `ray start`); one error line and exit code 2 when they do not come in time.

The fast tests drive session.wait_for_nodes with a fake node count; the slow ones run the command against a real
Ray cluster (ray.cluster_utils.Cluster) that has one node, then gets a second one while the command waits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from expo_dist.errors import ExpoError
from expo_dist.runtime import session
from expo_dist.spec import MergeSpec, build_spec
from expo_dist.testing.reference import assert_exact

ALPHA = 0.3

# ---------------------------------------------------------------------------------------------- fast lane


def test_wait_returns_once_enough_nodes_are_alive(monkeypatch):
    counts = iter([1, 1, 2, 3])
    monkeypatch.setattr(session, "alive_nodes", lambda: next(counts))
    t0 = time.monotonic()
    assert session.wait_for_nodes(3, timeout=30, poll=0.01) == 3
    assert time.monotonic() - t0 < 5


def test_wait_does_not_wait_when_the_nodes_are_there(monkeypatch):
    monkeypatch.setattr(session, "alive_nodes", lambda: 4)
    monkeypatch.setattr(session.time, "sleep", lambda s: pytest.fail("slept"))
    assert session.wait_for_nodes(2, timeout=30) == 4


def test_wait_times_out_with_one_line(monkeypatch):
    monkeypatch.setattr(session, "alive_nodes", lambda: 1)
    t0 = time.monotonic()
    with pytest.raises(ExpoError) as e:
        session.wait_for_nodes(3, timeout=0.3, poll=0.05)
    assert 0.25 < time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "only 1 of 3 Ray nodes" in msg and "0.3s" in msg and "\n" not in msg
    assert e.value.exit_code == 2


def test_wait_fields_go_through_the_schema(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sft: a\naligned: b\nalpha: 0.3\naddress: auto\nwait_nodes: 4\nwait_timeout: 90\n")
    spec = build_spec(str(cfg), {}).validate(need_out=False)
    assert (spec.wait_nodes, spec.wait_timeout) == (4, 90.0)
    spec = build_spec(str(cfg), {"wait_nodes": "2", "wait_timeout": "1.5"}).validate(need_out=False)  # the flags
    assert (spec.wait_nodes, spec.wait_timeout) == (2, 1.5)
    for key, bad, words in (("wait_nodes", "0", "at least 1"), ("wait_nodes", "true", "an integer"),
                            ("wait_timeout", "0", "more than 0"), ("wait_timeout", ".nan", "finite"),
                            ("wait_timeout", "yes", "number")):
        cfg.write_text(f"sft: a\naligned: b\nalpha: 0.3\naddress: auto\n{key}: {bad}\n")
        with pytest.raises(ExpoError, match=f"{key}.*{words}"):
            build_spec(str(cfg), {})
    with pytest.raises(ExpoError, match=r"--wait-nodes 2 needs --address"):
        MergeSpec(sft="a", aligned="b", alpha=0.3, wait_nodes=2).validate(need_out=False)
    MergeSpec(sft="a", aligned="b", alpha=0.3, wait_nodes=1).validate(need_out=False)  # one node: always there


# ---------------------------------------------------------------------------------------------- slow lane


@pytest.fixture(scope="module")
def one_node_cluster():
    """A Ray cluster with only its head node (one CPU); a test may add nodes. The test process is not connected."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def pair(pair_factory):
    return pair_factory(hidden_size=128, intermediate_size=256, vocab_size=512, seed=3)


def merge_cmd(pair, out, address, *extra):
    return [sys.executable, "-m", "expo_dist.cli", "merge", "--sft", str(pair[0]), "--aligned", str(pair[1]),
            "--alpha", str(ALPHA), "--out", str(out), "--address", address, "-q", *extra]


def _env():
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.slow
def test_times_out_with_one_line_and_exit_2(one_node_cluster, pair, tmp_path):
    t0 = time.monotonic()
    r = subprocess.run(merge_cmd(pair, tmp_path / "out", one_node_cluster.address, "--wait-nodes", "2",
                                 "--wait-timeout", "2"), capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("expo-dist: error: only 1 of 2 Ray nodes joined the cluster within 2s"), r.stderr
    assert sum("error" in ln for ln in lines) == 1, r.stderr
    assert time.monotonic() - t0 < 90
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_waits_for_the_node_then_merges_on_both(one_node_cluster, pair, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(merge_cmd(pair, out, one_node_cluster.address, "--wait-nodes", "2", "--wait-timeout",
                                      "120", "--max-task-bytes", "1MiB", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    lines: list[str] = []
    waiting = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)
            if "waiting for 2 Ray nodes" in line:
                waiting.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        # the second node arrives only once the command says it waits for it
        deadline = time.monotonic() + 120
        while not waiting.wait(0.2) and proc.poll() is None and time.monotonic() < deadline:
            pass
        assert waiting.is_set(), "".join(lines)
        one_node_cluster.add_node(num_cpus=1)
        stdout = proc.stdout.read()
        proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    stderr = "".join(lines)
    assert proc.returncode == 0, stderr
    assert "waiting for 2 Ray nodes (1 joined so far" in stderr, stderr
    assert json.loads(stdout)["out"] == str(out), stdout
    assert_exact(str(out), str(pair[0]), str(pair[1]), ALPHA, tie=False)
