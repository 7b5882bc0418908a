"""Locks that die with their holder, the retry condition, and hub access from the HF cache (offline)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx2
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from pipehelpers import REPO

from mergealign import hub
from mergealign.errors import MergeAlignError

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


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))


def test_transient_failures_only():
    assert hub.is_transient(HfHubHTTPError("busy", response=_response(503)))
    assert hub.is_transient(HfHubHTTPError("slow down", response=_response(429)))
    assert hub.is_transient(httpx2.ConnectError("connection refused"))
    assert hub.is_transient(TimeoutError("read timed out"))
    assert hub.is_transient(hub.HubUnreachable("network"))
    assert not hub.is_transient(RepositoryNotFoundError("no such repo", response=_response(404)))
    assert not hub.is_transient(HfHubHTTPError("unauthorized", response=_response(401)))
    assert not hub.is_transient(MergeAlignError("bad config"))
    assert not hub.is_transient(torch.OutOfMemoryError("CUDA out of memory"))
    assert not hub.is_transient(ValueError("validation"))
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = httpx2.ReadTimeout("timed out")
    assert hub.is_transient(wrapped)


@pytest.fixture
def hf_cache(tmp_path, tiny_zoo, monkeypatch):
    """A Hugging Face cache laid out as huggingface_hub writes it, holding org/tiny-base at one commit."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--tiny-base"
    shutil.copytree(tiny_zoo.base, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, sha


def test_offline_resolve_and_download_from_the_cache(hf_cache, tiny_zoo):
    cache, sha = hf_cache
    ref = hub.resolve("org/tiny-base")
    assert (ref.repo_id, ref.sha) == ("org/tiny-base", sha)
    snap = hub.download(ref, cache_dir=cache)
    assert snap == cache / "models--org--tiny-base" / "snapshots" / sha
    assert "model.safetensors" in hub.snapshot_files(snap)
    ck = hub.header_checkpoint(ref, cache_dir=cache)
    assert set(ck.tensors) == set(hub.Checkpoint(tiny_zoo.base).tensors)


def test_offline_missing_repo_says_how_to_run_offline(hf_cache):
    with pytest.raises(MergeAlignError, match="offline .* not in the local HF cache"):
        hub.resolve("org/not-there@main")
    ref = hub.ResolvedRef("org/not-there", None, "f" * 40)
    with pytest.raises(MergeAlignError, match="HF_HUB_OFFLINE=1"):
        hub.download(ref, cache_dir=hf_cache[0])


def test_header_only_checkpoint_goes_through_the_engine_preflight(tiny_zoo, tmp_path):
    """What the hub API gives before any weights are downloaded (config + tensor headers) is enough for the
    engine's preflight: a matching model passes, a different architecture is refused."""
    from mergealign.checkpoint import Checkpoint
    from mergealign.errors import PreflightError
    from mergealign.preflight import Input, preflight
    from mergealign.zoo_tiny import build_model

    def header_only(path):
        real = Checkpoint(path)
        return hub.HeaderCheckpoint(path, json.loads((path / "config.json").read_text()), dict(real.tensors),
                                    label=f"hub:{path.name}")  # fmt: skip

    base, aligned = Checkpoint(tiny_zoo.base), Checkpoint(tiny_zoo.aligned)
    result = preflight(
        [Input("base", base), Input("expert", header_only(tiny_zoo.expert)), Input("aligned", aligned)]
    )
    assert len(result.tensors) == len(base.tensors)
    with pytest.raises(MergeAlignError, match="weights not downloaded"):
        header_only(tiny_zoo.expert).get(next(iter(base.tensors)))
    qwen = build_model(tmp_path / "qwen", arch="qwen2", seed=3)
    with pytest.raises(PreflightError, match="architectures differ"):
        preflight([Input("base", base), Input("expert", header_only(qwen)), Input("aligned", aligned)])
