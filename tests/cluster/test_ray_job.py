"""`ray job submit` of an expo-dist merge to a running Ray cluster with the dashboard (ray[default]).

A real head is started with `ray start --head --block` in a subprocess (own ports, own temp dir, a
fresh auth token), the job is submitted with the `ray job` CLI, and the head is stopped by its PID.
Skipped without ray[default].
"""

from __future__ import annotations

import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from cluster_conftest import (
    ALPHA,
    SEED,
    SPLIT_ARGS,
    assert_exact_output,
    dump,
    free_port,
    manifest_workers,
    processes_of,
    ray_job_skip_reason,
    ray_logs,
    wait_until,
)

pytestmark = pytest.mark.skipif(ray_job_skip_reason() is not None, reason=str(ray_job_skip_reason()))


def _dashboard_up(url: str, token: str) -> bool:
    """The dashboard answers and its job API is loaded (it comes up after /api/version)."""
    for path in ("/api/version", "/api/jobs/"):
        req = urllib.request.Request(url + path, headers={"Authorization": "Bearer " + token})
        try:
            with urllib.request.urlopen(req, timeout=3) as r:
                if r.status != 200:
                    return False
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with dashboard + job server on free ports; yields (dashboard_url, client_env)."""
    # Short temp dir: Ray's unix socket paths live under it (limit 107 bytes).
    tmp = tempfile.mkdtemp(prefix="expo-rj-", dir="/tmp")
    logdir = pathlib.Path(tmp)  # head.log beside Ray's own session logs: ray_logs() shows both
    gcs, dash, client = free_port(), free_port(), free_port()
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # Token auth, explicitly: the head, its jobs and every client that talks to it need both.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--temp-dir={tmp}", "--num-cpus=2", "--disable-usage-stats",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--dashboard-agent-listen-port=0", "--min-worker-port=0", "--max-worker-port=0"]
    if shutil.which("ray") and subprocess.run([sys.executable, "-c", "import grpc"]).returncode == 0:
        cmd.append(f"--ray-client-server-port={client}")  # default 10001 may be taken on a shared host
    log = open(logdir / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        ok = wait_until(lambda: head.poll() is not None or _dashboard_up(url, token), 120)
        assert ok and head.poll() is None, f"ray head did not start:\n{dump(logdir / 'head.log')}"
        yield url, env, tmp
    finally:
        # Stop the head by PID: `ray start --block` stops its node's processes on SIGTERM.
        # (`ray stop` would stop every Ray on this machine, other tests' included.)
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(10)
        log.close()
        left = wait_until(lambda: not processes_of(markers=(tmp + "/",)), 30)
        shutil.rmtree(tmp, ignore_errors=True)
        assert left, processes_of(markers=(tmp + "/",))


def _ray(args, env, timeout=120):
    return subprocess.run(["ray", *args], env=env, capture_output=True, text=True, timeout=timeout)


def _job_status(url, sid, env) -> str:
    """JobStatus name (SUCCEEDED, FAILED, ...) from the job SDK, in a subprocess with the token env."""
    code = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    r = subprocess.run([sys.executable, "-c", code, url, sid], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout.strip().splitlines()[-1]


def _submit_and_wait(url, env, tmp, sid, wd, entrypoint, timeout=600) -> tuple[str, str]:
    """`ray job submit --no-wait`, then poll the job's status until it ends: (status, job logs).

    Polling instead of the CLI's websocket log tail: one HTTP request at a time, and on failure the head's
    logs say which Ray process went away."""
    r = _ray(["job", "submit", "--no-wait", "--address", url, "--submission-id", sid, "--working-dir", str(wd),
              "--", *entrypoint], env)
    assert r.returncode == 0, f"ray job submit: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n" \
                              f"{ray_logs(tmp)}"
    status = {"s": "PENDING"}

    def ended():
        try:
            status["s"] = _job_status(url, sid, env)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{ray_logs(tmp)}") from None
        return status["s"] in ("SUCCEEDED", "FAILED", "STOPPED")

    assert wait_until(ended, timeout, every=1.0), f"job {sid} still {status['s']} after {timeout} s\n{ray_logs(tmp)}"
    logs = _ray(["job", "logs", "--address", url, sid], env)
    assert logs.returncode == 0, logs.stderr[-3000:]
    return status["s"], logs.stdout


def test_ray_job_submit_merges_exactly(ray_head, pair_factory, tmp_path):
    url, env, tmp = ray_head
    sft, aligned = pair_factory("small", seed=SEED)
    out = tmp_path / "out"
    wd = tmp_path / "job_wd"  # the job's working_dir is uploaded: keep it tiny (no models in it)
    wd.mkdir()
    (wd / "README.txt").write_text("working dir of the expo-dist test job\n")
    sid = f"expo-test-{secrets.token_hex(4)}"
    t0 = time.monotonic()
    status, logs = _submit_and_wait(url, env, tmp, sid, wd, [
        "expo-dist", "merge", "--sft", str(sft), "--aligned", str(aligned), "--alpha", str(ALPHA),
        "--out", str(out), "--address", "auto", *SPLIT_ARGS])
    assert status == "SUCCEEDED", f"{logs[-6000:]}\n{ray_logs(tmp)}"
    assert str(out) in logs, logs[-4000:]  # expo-dist prints the output path on stdout

    workers = manifest_workers(out)
    assert sum(w["tasks"] for w in workers) > 0, workers
    assert_exact_output(out, sft, aligned)
    print(f"ray job submit → SUCCEEDED in {time.monotonic() - t0:.1f} s")


def test_ray_job_cli_without_token_is_refused(ray_head):
    url, env, _ = ray_head
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    bare["HOME"] = tempfile.mkdtemp(prefix="expo-home-")  # no ~/.ray/auth_token either
    try:
        r = _ray(["job", "list", "--address", url], bare)
    finally:
        shutil.rmtree(bare["HOME"], ignore_errors=True)
    assert r.returncode != 0
    assert "auth" in (r.stdout + r.stderr).lower(), (r.stdout, r.stderr)


def test_ray_job_submit_failing_merge_is_failed(ray_head, tmp_path):
    url, env, tmp = ray_head
    wd = tmp_path / "job_wd"
    wd.mkdir()
    sid = f"expo-test-fail-{secrets.token_hex(4)}"
    status, logs = _submit_and_wait(url, env, tmp, sid, wd, [
        "expo-dist", "merge", "--sft", str(tmp_path / "no-sft"), "--aligned", str(tmp_path / "no-aligned"),
        "--alpha", str(ALPHA), "--out", str(tmp_path / "out"), "--address", "auto"], timeout=300)
    assert status == "FAILED", logs[-4000:]
    assert "no-sft" in logs, logs[-4000:]  # expo-dist's one-line error names the missing folder
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
