"""Artifact locks (tasks.locks) that exclude other holders and die with their holder's process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.helpers.study import REPO

HOLD = """
import sys, time
from tasks.locks import ArtifactLockManager
m = ArtifactLockManager(sys.argv[1])
assert m.acquire_lock("merge-k", holder="other-process")
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_excludes_other_holders_and_dies_with_its_process(tmp_path):
    from tasks.locks import ArtifactLockManager

    m = ArtifactLockManager(tmp_path / "locks")
    assert m.acquire_lock("k", holder="a")
    assert m.is_locked("k") and m.is_lock_holder("k", "a") and not m.is_lock_holder("k", "b")
    assert m.acquire_lock("k", holder="b", acquire_timeout=0.3) is False
    m.release_lock("k", holder="a")
    assert not m.is_locked("k")
    assert m.acquire_lock("k", holder="b", acquire_timeout=0.3)
    m.release_lock("k", holder="b")

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "locks")], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "locked"
        other = ArtifactLockManager(tmp_path / "locks")  # a fresh copy: state comes from the file lock
        assert other.is_locked("merge-k")
        assert other.acquire_lock("merge-k", holder="me", acquire_timeout=0.5) is False
        info = json.loads((tmp_path / "locks" / "merge-k.lock").read_text())
        assert info["holder"] == "other-process" and info["pid"] == proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # the killed holder's lock file is still there, but the kernel released its flock
    assert (tmp_path / "locks" / "merge-k.lock").exists()
    t0 = time.monotonic()
    assert other.acquire_lock("merge-k", holder="me", acquire_timeout=5)
    assert time.monotonic() - t0 < 1.0
    other.release_lock("merge-k", holder="me")
