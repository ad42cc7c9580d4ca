"""s3:// on a real 3-node Ray cluster (ray.cluster_utils.Cluster on this machine) against a real S3 server
(SeaweedFS on 127.0.0.1, tests/s3server.py): issue 12, "What must hold" 2 and 4.

Every node has its own scratch folder (TMPDIR) and no output folder at all: the merge writes nothing of the output
to local disk, and the objects in the bucket are byte-identical to a local-disk merge of the same pair, for one α
and for a sweep, from local and from s3:// inputs. The workers reach the server through a small TCP proxy in this
process that logs every request with the pid of the process that sent it, so a test can see that the driver
uploads no part and each worker uploads exactly the parts of the tasks it ran, and can slow uploads down to kill a
worker while its part is on the wire. Faults (a worker killed mid-upload, a node removed mid-merge) end
byte-identical with no multipart upload left open.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from urllib.parse import parse_qs, unquote, urlsplit

import faulthooks
import psutil
import pytest
from clusters import ray_cluster
from faultwait import finish, in_thread, merge_workers, wait_for
from s3server import assert_same_output, bucket, download_prefix, uploads

from expo_dist.merge import run
from expo_dist.sources import s3
from expo_dist.spec import MergeSpec
from expo_dist.testing.synth import make_pair

pytestmark = pytest.mark.slow
MIB = 1 << 20
SHARD = 8_000_000  # output shards of ~8 MB: files of two 5 MiB parts
TASK = 5 * MIB  # the smallest part S3 takes: several tasks per file, spread over the nodes
ALPHA = 0.3
SWEEP = [0.1, 0.5]
NODES = 3
_names = itertools.count()
_REQUEST = re.compile(rb"(GET|PUT|POST|DELETE|HEAD) (\S+) HTTP/1\.[01]\r\n")


class Conn:
    def __init__(self, port: int):
        self.port = port  # the client's port on 127.0.0.1
        self.pid: int | None = None
        self.fresh = True  # the next bytes from the client start a request
        self.inflight = 0  # bytes of the current request forwarded so far
        self.line = b""  # the current request's request line
        self.open = True


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server: logs each HTTP request (method, path, the sending pid)
    and, while `rate` is set, forwards what clients send at most `rate` bytes/s per connection."""

    def __init__(self, target: str):
        self.target = ("127.0.0.1", urlsplit(target).port)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.rate: float | None = None
        self.lock = threading.Lock()
        self.conns: list[Conn] = []
        self.requests: list[tuple[int | None, str, str]] = []  # (pid, method, path with query)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, addr = self.sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            conn = Conn(addr[1])
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._up, args=(conn, c, up), daemon=True).start()
            threading.Thread(target=self._down, args=(conn, c, up), daemon=True).start()

    def _pid(self, conn: Conn) -> int | None:
        for k in psutil.net_connections(kind="tcp4"):
            if k.laddr and k.raddr and k.laddr.port == conn.port and k.raddr.port == self.port:
                return k.pid
        return None

    def _up(self, conn: Conn, c: socket.socket, up: socket.socket) -> None:
        try:
            while True:
                data = c.recv(1 << 16)
                if not data:
                    break
                m = _REQUEST.match(data) if conn.fresh else None
                if m:
                    if conn.pid is None:
                        conn.pid = self._pid(conn)
                    conn.line, conn.inflight = m.group(0), 0
                    with self.lock:
                        self.requests.append((conn.pid, m.group(1).decode(), m.group(2).decode()))
                conn.fresh = False
                up.sendall(data)
                conn.inflight += len(data)
                rate = self.rate
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            conn.open = False
            for s in (c, up):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _down(self, conn: Conn, c: socket.socket, up: socket.socket) -> None:
        try:
            while True:
                data = up.recv(1 << 16)
                if not data:
                    break
                conn.fresh = True  # (an answer, or a "100 Continue" before the body: either way a new start)
                c.sendall(data)
        except OSError:
            pass
        finally:
            conn.open = False
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def uploading(self, at_least: int) -> list[Conn]:
        """Connections in the middle of sending a part's bytes (at least `at_least` of them so far)."""
        with self.lock:
            return [k for k in self.conns if k.open and b"partNumber=" in k.line and k.inflight >= at_least]

    def parts(self, bucket: str) -> list[tuple[int | None, str, int]]:
        """(pid, key, part number) of every UploadPart request into bucket, in order."""
        with self.lock:
            reqs = list(self.requests)
        return [(pid, *part) for pid, method, path in reqs if (part := upload_part(method, path, bucket))]


def upload_part(method: str, path: str, bucket: str) -> tuple[str, int] | None:
    """(key, part number) of an UploadPart request into bucket; None for any other request."""
    u = urlsplit(path)
    q = parse_qs(u.query)
    b, _, key = unquote(u.path).lstrip("/").partition("/")
    if method == "PUT" and b == bucket and "partNumber" in q and "uploadId" in q:
        return key, int(q["partNumber"][0])
    return None


@pytest.fixture(scope="module")
def proxy(srv):
    p = Proxy(srv.endpoint)
    yield p
    p.close()


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "faults.json"
    path.write_text("{}")

    def set_faults(**kw):
        path.write_text(json.dumps(kw))

    set_faults.path = path
    return set_faults


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One scratch folder per node (its TMPDIR): no two nodes share a folder the output could go to."""
    return [str(tmp_path_factory.mktemp(f"node{k}")) for k in range(NODES)]


@pytest.fixture(scope="module")
def cluster(srv, proxy, faults, scratch):
    """3 one-CPU nodes, each with its own TMPDIR; the faults file in every node's environment (their workers read
    it); in the driver's (this process's): the hooks and the S3 settings (through the proxy), which the workers get
    from the driver."""
    hooks = faulthooks.env(faults=faults.path)
    nodes_env = {faulthooks.FAULTS_ENV: hooks.pop(faulthooks.FAULTS_ENV)}
    with ray_cluster(NODES, env=nodes_env, node_env=[{"TMPDIR": d} for d in scratch]) as c, \
            pytest.MonkeyPatch.context() as mp:
        for k, v in {**hooks, **srv.env(), "AWS_ENDPOINT_URL": proxy.endpoint}.items():
            mp.setenv(k, v)
        s3._CLIENTS.clear()
        yield c
        s3._CLIENTS.clear()


@pytest.fixture(scope="module")
def worker_cwds(cluster):
    """The working folder of the worker processes on every node (where a relative 's3:/...' would land)."""
    import ray

    @ray.remote(num_cpus=1)
    def where():
        import tempfile

        return os.getcwd(), tempfile.gettempdir()

    return sorted({p for pair in ray.get([where.remote() for _ in range(2 * NODES)]) for p in pair})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("s3clpair")
    sft, aligned = make_pair(d, hidden_size=512, intermediate_size=1536, num_layers=3, num_heads=8, num_kv_heads=4,
                             vocab_size=3000, sft_shard_bytes=7_000_000, aligned_shard_bytes=5_000_000, seed=12)
    return str(sft), str(aligned)


@pytest.fixture(scope="module")
def baseline(cluster, pair, faults, tmp_path_factory):
    """Local-disk merges of the pair on the same cluster: one alpha, and a sweep (same output shard size)."""
    faults()
    d = tmp_path_factory.mktemp("s3clbase")
    one, sweep = str(d / "one"), str(d / "sweep")
    run(MergeSpec(sft=pair[0], aligned=pair[1], alpha=ALPHA, out=one, max_shard_size=SHARD), progress=False)
    run(MergeSpec(sft=pair[0], aligned=pair[1], alpha=SWEEP, out=sweep, max_shard_size=SHARD), progress=False)
    return one, sweep


def local_tree(roots: list[str]) -> set[str]:
    """Every path under these folders (what a merge may have left on local disk)."""
    out = set()
    for root in roots:
        for dirpath, dirs, names in os.walk(root):
            out.update(os.path.join(dirpath, n) for n in dirs + names)
    return out


def assert_nothing_local(roots: list[str], before: set[str], tops: list[str]) -> None:
    """No 's3:' folder (a URL taken for a path) in any working or temporary folder, and nothing new of the output
    in the nodes' scratch folders."""
    for top in tops:
        assert not os.path.exists(os.path.join(top, "s3:")), top
    new = local_tree(roots) - before
    assert not [p for p in new if "s3:" in p or p.endswith((".safetensors", ".json", ".md"))], sorted(new)


def assert_parts_by_workers(proxy: Proxy, bucket: str, man: dict, outputs: int) -> None:
    """The driver uploaded no part; every part was uploaded once, by a worker, and each worker uploaded as many
    parts as it ran tasks (times the outputs of a sweep): each node uploads only its own tasks' parts."""
    parts = proxy.parts(bucket)
    pids = {w["pid"]: w for w in man["workers"]}
    by_pid = Counter(pid for pid, _, _ in parts)
    assert os.getpid() not in by_pid, by_pid
    assert set(by_pid) <= set(pids), (by_pid, man["workers"])
    for pid, w in pids.items():
        assert by_pid.get(pid, 0) == w["tasks"] * outputs, (pid, by_pid, man["workers"])
    assert len(parts) == len({(k, n) for _, k, n in parts}) == man["tasks"] * outputs
    assert len({pids[pid]["node_id"] for pid in by_pid}) > 1, man["workers"]  # more than one node uploaded


@pytest.mark.parametrize("alpha", [ALPHA, SWEEP], ids=["one-alpha", "sweep"])
def test_three_nodes_to_s3_byte_identical(srv, proxy, cluster, pair, baseline, scratch, worker_cwds, faults,
                                          alpha, tmp_path):
    faults()
    b = bucket(srv, "expocl")
    c = srv.client()
    roots = [*scratch]
    before = local_tree(roots)
    man = run(MergeSpec(sft=pair[0], aligned=pair[1], alpha=alpha, out=f"s3://{b}/m", max_shard_size=SHARD,
                        max_task_bytes=TASK), progress=False)
    assert uploads(c, b) == []
    assert_nothing_local(roots, before, [os.getcwd(), str(tmp_path), *worker_cwds])
    ran = [w for w in man["workers"] if w["tasks"] > 0]
    assert len({w["node_id"] for w in ran}) > 1, man["workers"]  # tasks ran on more than one node
    assert sum(w["tasks"] for w in man["workers"]) == man["tasks"] == man["task_attempts"]
    sweep = isinstance(alpha, list)
    assert_parts_by_workers(proxy, b, man, len(alpha) if sweep else 1)
    names = download_prefix(c, b, "m", str(tmp_path / "dl"))
    assert not any(n.startswith(".expo") for n in names)
    mans = assert_same_output(str(tmp_path / "dl"), baseline[1] if sweep else baseline[0])
    if sweep:
        assert sorted(mans) == [f"alpha-{a}/expo_manifest.json" for a in SWEEP]
    for m in mans.values():
        assert m["tasks"] >= 6  # several parts per file


def test_three_nodes_s3_inputs_to_s3_sweep(srv, proxy, cluster, pair, baseline, scratch, worker_cwds, faults,
                                           tmp_path):
    """Inputs read with ranged GETs, a sweep written: no local disk on any node."""
    faults()
    b = bucket(srv, "expocl")
    c = srv.client()
    for who, folder in (("sft", pair[0]), ("aligned", pair[1])):
        for n in os.listdir(folder):
            c.upload_file(os.path.join(folder, n), b, f"in/{who}/{n}")
    roots = [*scratch]
    before = local_tree(roots)
    man = run(MergeSpec(sft=f"s3://{b}/in/sft", aligned=f"s3://{b}/in/aligned", alpha=SWEEP, out=f"s3://{b}/out",
                        max_shard_size=SHARD, max_task_bytes=TASK), progress=False)
    assert uploads(c, b) == []
    assert_nothing_local(roots, before, [os.getcwd(), str(tmp_path), *worker_cwds])
    assert_parts_by_workers(proxy, b, man, len(SWEEP))
    # the workers read the inputs themselves, with ranged GETs through the proxy
    readers = {pid for pid, method, path in proxy.requests if method == "GET" and f"/{b}/in/" in path}
    assert readers & {w["pid"] for w in man["workers"]}, readers
    download_prefix(c, b, "out", str(tmp_path / "dl"))
    mans = assert_same_output(str(tmp_path / "dl"), baseline[1], same_inputs=False)
    assert sorted(mans) == [f"alpha-{a}/expo_manifest.json" for a in SWEEP]
    assert f"s3://{b}/in/aligned" in (tmp_path / "dl" / "alpha-0.1" / "README.md").read_text()


def test_worker_killed_mid_upload(srv, proxy, cluster, pair, baseline, faults, tmp_path):
    """Uploads slowed to 2 MiB/s; a worker is SIGKILLed while a part's bytes are on the wire (the server gets a
    truncated body). Its task is uploaded again elsewhere; the output is byte-identical, no upload left open."""
    faults()
    b = bucket(srv, "expocl")
    c = srv.client()
    proxy.rate = 2 * MIB
    try:
        box = in_thread(lambda: run(MergeSpec(sft=pair[0], aligned=pair[1], alpha=ALPHA, out=f"s3://{b}/k",
                                              max_shard_size=SHARD, max_task_bytes=TASK), progress=False))
        workers = set()

        def victim():
            workers.update(p.pid for p in merge_workers())
            for k in proxy.uploading(MIB):
                if k.pid in workers and k.pid != os.getpid():
                    return k
            return None

        conn = wait_for(victim, what="a worker in the middle of a part upload")
        sent, line = conn.inflight, _REQUEST.match(conn.line)
        os.kill(conn.pid, signal.SIGKILL)
        assert sent < TASK  # killed before its part was all sent
    finally:
        proxy.rate = None
    m = finish(box)
    cut = upload_part(line.group(1).decode(), line.group(2).decode(), b)
    assert cut is not None
    again = [pid for pid, *part in proxy.parts(b) if tuple(part) == cut]
    assert again[0] == conn.pid and len(again) == 2 and again[1] != conn.pid, again  # the cut part, sent again
    dead = [w for w in m["workers"] if w.get("died")]
    assert [w["pid"] for w in dead] == [conn.pid], m["workers"]
    assert m["task_attempts"] == m["tasks"] + 1  # the task it was uploading ran again; nothing else did
    assert sum(w["tasks"] for w in m["workers"]) == m["tasks"]
    assert uploads(c, b) == []
    download_prefix(c, b, "k", str(tmp_path / "dl"))
    assert_same_output(str(tmp_path / "dl"), baseline[0])


def test_node_removed_mid_merge(srv, proxy, cluster, pair, baseline, faults, scratch, tmp_path):
    """Runs last: a non-head node is removed just after its worker started uploading a part, whose task it has
    not reported (each task sleeps after its upload). That part is uploaded again by a worker on another node;
    byte-identical, no upload left open. A node is added back afterwards."""
    from ray._private import ray_constants

    faults(delay=0.6)
    b = bucket(srv, "expocl")
    c = srv.client()
    box = in_thread(lambda: run(MergeSpec(sft=pair[0], aligned=pair[1], alpha=ALPHA, out=f"s3://{b}/n",
                                          max_shard_size=SHARD, max_task_bytes=TASK), progress=False))

    def raylet(node):
        return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid

    seen: dict[int, int] = {}  # worker pid -> parts it had uploaded when first seen

    def just_uploaded():
        """A worker node whose worker has just started uploading a part (its task then sleeps, unreported)."""
        by_pid = Counter(pid for pid, _, _ in proxy.parts(b))
        for node in cluster.worker_nodes:
            for p in merge_workers(raylet(node)):
                if by_pid[p.pid] > seen.setdefault(p.pid, by_pid[p.pid]):
                    return node
        return None

    try:
        node = wait_for(just_uploaded, what="a part upload by a worker on a non-head node")
        lost = {p.pid for p in merge_workers(raylet(node))}
        cluster.remove_node(node)
        try:
            m = finish(box)
        finally:
            faults()
    finally:
        cluster.add_node(num_cpus=1, env_vars={"TMPDIR": scratch[-1]})
    assert m["task_attempts"] > m["tasks"]
    dead = {w["pid"] for w in m["workers"] if w.get("died")}
    assert dead == lost, m["workers"]
    assert sum(w["tasks"] for w in m["workers"]) == m["tasks"]  # each task finished once
    parts = proxy.parts(b)
    (gone,) = lost
    ran = {w["pid"]: w["tasks"] for w in m["workers"]}
    assert sum(pid == gone for pid, _, _ in parts) > ran[gone]  # it uploaded a part whose task it never reported
    assert len(parts) > len({tuple(p[1:]) for p in parts}) == m["tasks"]  # ... which was uploaded again
    assert uploads(c, b) == []
    download_prefix(c, b, "n", str(tmp_path / "dl"))
    assert_same_output(str(tmp_path / "dl"), baseline[0])
