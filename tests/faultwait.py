"""Helpers of the fault tests: run a merge in a thread, wait for a condition, find the MergeWorker processes."""

from __future__ import annotations

import os
import threading
import time

import psutil


def in_thread(fn):
    """Run fn in a daemon thread; finish(box) returns its result or raises its error."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    box["thread"] = t
    return box


def finish(box, timeout=240):
    box["thread"].join(timeout)
    assert not box["thread"].is_alive(), "the merge did not finish"
    if "error" in box:
        raise box["error"]
    return box["result"]


def wait_for(cond, timeout=120, what="condition", poll=0.02):
    """Poll cond until it returns something true (returned), at most timeout seconds."""
    t0 = time.monotonic()
    while not (got := cond()):
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(poll)
    return got


def merge_workers(root_pid=None, busy=False):
    """MergeWorker processes under root_pid (default: this test process, whose children are the nodes)."""
    procs = []
    for p in psutil.Process(root_pid or os.getpid()).children(recursive=True):
        try:
            title = (p.cmdline() or [""])[0]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title == "ray::MergeWorker.run" or (not busy and title.startswith("ray::MergeWorker")):
            procs.append(p)
    return procs
