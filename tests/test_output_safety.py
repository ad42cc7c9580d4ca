"""The tool owns only what it wrote: --overwrite, the output lock, symlinked side files, resume identity, SIGTERM.

Every test here puts a user's data next to (or behind) the output and proves it survives, byte for byte.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import faulthooks
import pytest

from expo_dist.cli import main
from expo_dist.errors import ExpoError
from expo_dist.formats.folder import side_files
from expo_dist.merge import build_plan, fingerprint, prepare_output
from expo_dist.output.journal import Journal
from expo_dist.output.lock import OutputLock
from expo_dist.output.owned import clear_owned
from expo_dist.spec import MergeSpec
from expo_dist.testing.reference import assert_exact, assert_same

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHA = 0.3
SETTINGS = ["--max-task-bytes", "1MiB", "--max-shard-size", "3MB", "--workers", "2", "-q"]


@pytest.fixture(scope="module")
def pair(pair_factory):
    return pair_factory(seed=5, hidden_size=256, intermediate_size=688, num_layers=2, vocab_size=2048,
                        sft_shard_bytes=3_000_000, aligned_shard_bytes=2_000_000)


def argv(pair, out, *extra, alpha=(ALPHA,)):
    return ["merge", "--sft", str(pair[0]), "--aligned", str(pair[1]), "--alpha", *map(str, alpha),
            "--out", str(out), *SETTINGS, *extra]


def snapshot(folder) -> dict:
    """Every entry under folder (not following links): kind and content or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                out[rel] = ("file", open(p, "rb").read())
            else:
                out[rel] = ("dir", None)
    return out


def user_folder(path):
    """A home-like folder: a paper, a dotfile, a symlink, a folder named like a sweep output."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.tex").write_text("\\documentclass{article} years of work\n")
    (path / ".bashrc").write_text("export PATH=$HOME/bin:$PATH\n")
    (path / "link-to-thesis").symlink_to(path / "thesis.tex")
    (path / "alpha-project").mkdir()
    (path / "alpha-project" / "notes.md").write_text("not a merge output\n")
    return snapshot(path)


def test_overwrite_refuses_a_folder_of_user_files_and_removes_nothing(pair, tmp_path, capsys):
    home = tmp_path / "home"
    before = user_folder(home)
    code = main(argv(pair, home, "--overwrite"))
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("expo-dist: error:") and "did not write" in line, err
    for name in ("thesis.tex", ".bashrc", "link-to-thesis", "alpha-project/"):
        assert name in line, line
    assert "Traceback" not in err
    assert snapshot(home) == before  # every file, dotfile, symlink and folder survives, content and target


def test_overwrite_of_a_sweep_keeps_a_foreign_alpha_folder(local_ray, pair, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(argv(pair, out, alpha=(0.1, 0.5))) == 0
    assert sorted(os.listdir(out)) == ["alpha-0.1", "alpha-0.5"]
    (out / "alpha-x").mkdir()
    (out / "alpha-x" / "mine.txt").write_text("mine")
    before = snapshot(out)
    capsys.readouterr()
    assert main(argv(pair, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "alpha-x/" in err.strip().splitlines()[-1] and "alpha-0.1" not in err.strip().splitlines()[-1], err
    assert snapshot(out) == before
    shutil.rmtree(out / "alpha-x")
    # only expo_dist's own outputs left: --overwrite replaces the sweep with a single merge
    assert main(argv(pair, out, "--overwrite")) == 0
    assert not (out / "alpha-0.1").exists() and not (out / "alpha-0.5").exists()
    assert_exact(str(out), str(pair[0]), str(pair[1]), ALPHA, tie=False)


def test_overwrite_of_an_earlier_output_removes_what_it_wrote_and_nothing_else(local_ray, pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(pair, out, alpha=(0.5,))) == 0
    manifest = json.loads((out / "expo_manifest.json").read_text())
    assert sorted(manifest["written"]) == sorted(os.listdir(out))  # the manifest names everything it wrote
    (out / "my-eval.jsonl").write_text("{}\n")
    before = snapshot(out)
    capsys.readouterr()
    assert main(argv(pair, out, "--overwrite")) == 2  # a stranger: refused, nothing removed
    assert "my-eval.jsonl" in capsys.readouterr().err
    assert snapshot(out) == before
    os.unlink(out / "my-eval.jsonl")
    assert main(argv(pair, out, "--overwrite")) == 0
    assert_exact(str(out), str(pair[0]), str(pair[1]), ALPHA, tie=False)


def test_clear_owned_never_follows_a_link_named_like_an_output(tmp_path):
    """A manifest-named file that is a symlink: the link goes, its target stays."""
    out = tmp_path / "out"
    out.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (out / "expo_manifest.json").write_text(json.dumps({"tool": "expo_dist", "written": [
        "expo_manifest.json", "config.json", "../precious.txt", "/etc/passwd"]}))
    (out / "config.json").symlink_to(precious)
    assert clear_owned(str(out)) == 2
    assert os.listdir(out) == [] and precious.read_text() == "keep me"


# ---- the lock -------------------------------------------------------------------------------------------------

HOLD = """
import sys, time
from expo_dist.output.lock import OutputLock
lock = OutputLock(sys.argv[1], "test").acquire()
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_lock_refuses_a_second_holder_names_it_and_is_free_when_it_dies(tmp_path):
    wdir = str(tmp_path / ".expo")
    p = subprocess.Popen([sys.executable, "-c", HOLD, wdir], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(ExpoError) as e:
            OutputLock(wdir, "--out X").acquire()
        assert f"pid {p.pid} on" in str(e.value) and "\n" not in str(e.value)
    finally:
        p.kill()
        p.wait()
    with OutputLock(wdir, "--out X"):  # the kernel dropped the dead holder's lock: no stale lock to clean up
        pass


def test_lock_survives_its_file_being_removed_by_the_finishing_holder(tmp_path):
    wdir = str(tmp_path / ".expo")
    a = OutputLock(wdir, "a").acquire()
    shutil.rmtree(wdir)  # a finished run removes its work folder while it still holds the lock
    b = OutputLock(wdir, "b").acquire()  # a new file, a new lock
    with pytest.raises(ExpoError):
        OutputLock(wdir, "c").acquire()
    a.release()
    b.release()


def test_lease_when_flock_is_refused(tmp_path, monkeypatch):
    """Where the file system has no flock (Lustre without -o flock): a lease file with host, pid, heartbeat."""
    import errno
    import fcntl

    import expo_dist.output.lock as outlock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    wdir = str(tmp_path / ".expo")
    a = OutputLock(wdir, "a").acquire()
    assert a.lease and os.path.exists(os.path.join(wdir, "lock.lease"))
    with pytest.raises(ExpoError) as e:  # a live holder on this host
        OutputLock(wdir, "b").acquire()
    assert f"pid {os.getpid()}" in str(e.value)
    a.release()
    assert not os.path.exists(os.path.join(wdir, "lock.lease"))
    # a lease left by a dead process on this host is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = os.path.join(wdir, "lock.lease")
    with open(lease, "w") as f:
        json.dump({"host": os.uname().nodename, "pid": int(dead.stdout), "since": time.time(),
                   "heartbeat": time.time()}, f)
    OutputLock(wdir, "c").acquire().release()
    # a lease of another host is taken over only once its heartbeat is older than STALE
    with open(lease, "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "since": 0, "heartbeat": time.time()}, f)
    with pytest.raises(ExpoError):
        OutputLock(wdir, "d").acquire()
    with open(lease, "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "since": 0, "heartbeat": time.time() - outlock.STALE - 1}, f)
    OutputLock(wdir, "e").acquire().release()


def test_second_run_on_the_same_out_is_refused_and_the_first_is_intact(local_ray, pair, tmp_path, capsys):
    lone = tmp_path / "lone"
    assert main(argv(pair, lone)) == 0
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(faulthooks.env(delay=0.2))
    first = subprocess.Popen([sys.executable, "-m", "expo_dist.cli", *argv(pair, out)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while len(Journal(str(out / ".expo")).entries()) < 2:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() - t0 < 120
        time.sleep(0.05)
    capsys.readouterr()
    for extra in ((), ("--overwrite",)):  # neither resuming nor discarding a running merge
        assert main(argv(pair, out, *extra)) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {first.pid} on" in err and len(err.strip().splitlines()) == 1, err
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_same(out, lone)


# ---- side files ---------------------------------------------------------------------------------------------

def test_side_files_never_follow_a_link_out_of_the_model_folder(tmp_path):
    model = tmp_path / "aligned"
    model.mkdir()
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (model / "config.json").write_text("{}")
    (model / "merges.txt").symlink_to(secret)                      # a cloned repo pointing at ~/.ssh
    (model / "added_tokens.json").symlink_to("/proc/self/environ")  # the process's secrets
    (model / "vocab.txt").symlink_to("/dev/zero")                   # endless
    os.mkfifo(model / "special_tokens_map.json")                    # would block a reader forever
    (model / "sub").mkdir()
    (model / "sub" / "real.json").write_text('{"inside": true}')
    (model / "tokenizer_config.json").symlink_to("sub/real.json")    # a link inside the folder: fine
    (model / "dangling.txt").symlink_to(tmp_path / "gone")
    warn = []
    assert side_files(str(model), warn) == ["config.json", "tokenizer_config.json"]
    text = "\n".join(warn)
    for name in ("merges.txt", "added_tokens.json", "vocab.txt", "special_tokens_map.json", "dangling.txt"):
        assert name in text, text


def test_side_files_follow_hf_cache_blob_links(tmp_path):
    repo = tmp_path / "hub" / "models--org--m"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text("{}")
    (snap / "tokenizer.json").symlink_to("../../blobs/f00d")
    (tmp_path / "hub" / "other").write_text("not this repo's")
    (snap / "vocab.json").symlink_to("../../../other")
    warn = []
    assert side_files(str(snap), warn) == ["tokenizer.json"]
    assert "vocab.json" in warn[0]


def test_merge_leaves_linked_secrets_out_and_says_so(local_ray, pair, tmp_path, caplog):
    aligned = tmp_path / "aligned"
    shutil.copytree(pair[1], aligned)
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY\n")
    (aligned / "merges.txt").symlink_to(secret)
    out = tmp_path / "out"
    assert main(["merge", "--sft", str(pair[0]), "--aligned", str(aligned), "--alpha", str(ALPHA),
                 "--out", str(out), *SETTINGS]) == 0
    assert not (out / "merges.txt").exists()
    assert all(b"PRIVATE KEY" not in p.read_bytes() for p in out.iterdir() if p.is_file())
    assert sum("merges.txt" in r.getMessage() for r in caplog.records) == 1  # said once, before the merge
    manifest = json.loads((out / "expo_manifest.json").read_text())
    assert any("merges.txt" in w for w in manifest["warnings"])
    assert (out / "config.json").read_bytes() == (pair[1] / "config.json").read_bytes()


# ---- resume identity ------------------------------------------------------------------------------------------

def test_resume_refuses_an_input_rewritten_in_place_with_its_mtime_set_back(pair, tmp_path):
    sft = tmp_path / "sft"
    shutil.copytree(pair[0], sft)
    spec = MergeSpec(sft=str(sft), aligned=str(pair[1]), alpha=ALPHA, out=str(tmp_path / "out"),
                     max_task_bytes="1MiB", max_shard_size="3MB").validate()
    plan, _, aligned = build_plan(spec)
    prepare_output(spec, plan, aligned.root).release()
    fp = fingerprint(plan, spec)
    victim = next(p for p in sft.iterdir() if p.suffix == ".safetensors")
    st = os.stat(victim)
    with open(victim, "r+b") as f:  # same size, different weights, mtime put back
        f.seek(st.st_size - 2)
        f.write(bytes(2 * [0x7F]))
    time.sleep(0.01)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(victim).st_mtime_ns == st.st_mtime_ns and os.stat(victim).st_size == st.st_size
    assert fingerprint(plan, spec) != fp
    with pytest.raises(ExpoError, match="unfinished merge of different inputs"):
        prepare_output(spec, plan, aligned.root)


# ---- SIGTERM --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("after", [0.2, 0.3, 0.5, 1.0, 2.0, 2.5, 3.0, 4.0])
def test_sigterm_exits_143_wherever_it_lands(pair, tmp_path, after):
    """Before Ray starts, while it starts, and mid-merge: always one line and 143 (Slurm reads it)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(faulthooks.env(delay=0.3))
    p = subprocess.Popen([sys.executable, "-m", "expo_dist.cli", *argv(pair, tmp_path / "out")], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("expo-dist: terminated"), stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "out" / "expo_manifest.json").exists()


def test_staging_never_truncates_through_a_link_in_the_work_folder(pair, tmp_path):
    from expo_dist.output.finalize import create_shards

    spec = MergeSpec(sft=str(pair[0]), aligned=str(pair[1]), alpha=ALPHA, out=str(tmp_path / "out"),
                     max_task_bytes="1MiB", max_shard_size="3MB").validate()
    plan, _, _ = build_plan(spec)
    wdir = tmp_path / "out" / ".expo"
    wdir.mkdir(parents=True)
    precious = tmp_path / "precious.bin"
    precious.write_bytes(b"years of work")
    (wdir / plan.shards[0].file).symlink_to(precious)
    with pytest.raises(OSError):
        create_shards(plan, str(wdir))
    assert precious.read_bytes() == b"years of work"
