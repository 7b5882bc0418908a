"""Hub access (mergealign.hub): the retry condition, resolving and downloading from the HF cache offline,
and header-only checkpoints through the engine's preflight."""

from __future__ import annotations

import json
import shutil

import httpx2
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from mergealign import hub
from mergealign.errors import MergeAlignError


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
