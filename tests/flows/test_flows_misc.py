"""Retries only for transient failures (real Prefect engine), a hub model that is neither reachable nor cached
(clear error, no retry storm), and the merge flow on its own."""

from __future__ import annotations

import httpx2
import pytest
from huggingface_hub.errors import RepositoryNotFoundError

from mergealign.errors import ConfigError, MergeAlignError
from tests.helpers.study import study_config, write_config


def _flaky_flow(exc_factory, fail_times: int):
    from prefect import flow, task

    from tasks.cache import retry_if_transient

    calls = []

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_if_transient)
    def step() -> int:
        calls.append(1)
        if len(calls) <= fail_times:
            raise exc_factory()
        return len(calls)

    @flow
    def probe() -> int:
        return step()

    return probe, calls


def test_transient_failures_are_retried_permanent_ones_are_not(prefect_api):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/x")
    probe, calls = _flaky_flow(lambda: httpx2.ConnectError("connection reset", request=request), fail_times=2)
    assert probe() == 3 and len(calls) == 3

    probe, calls = _flaky_flow(lambda: RepositoryNotFoundError("404", response=httpx2.Response(404, request=request)),
                               fail_times=1)  # fmt: skip
    with pytest.raises(RepositoryNotFoundError):
        probe()
    assert len(calls) == 1

    probe, calls = _flaky_flow(lambda: MergeAlignError("bad input"), fail_times=1)
    with pytest.raises(MergeAlignError):
        probe()
    assert len(calls) == 1


def test_uncached_hub_model_offline_fails_at_once_with_offline_help(
    prefect_api, tiny_zoo, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    from flows.study import mergealign_study

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    cfg = study_config(tmp_path, tiny_zoo)
    cfg["models"]["aligned"] = {"hub": "org/not-in-the-cache", "revision": "main"}
    with pytest.raises(MergeAlignError, match="offline .*not in the local HF cache.*name a local directory"):
        mergealign_study(str(write_config(tmp_path / "c.yaml", cfg)))
    assert not (tmp_path / "artifacts" / "models").exists()


def test_merge_flow_alone(prefect_api, tiny_zoo, tmp_path):
    from pathlib import Path

    from flows.merge import merge_flow

    path = write_config(tmp_path / "c.yaml", study_config(tmp_path, tiny_zoo))
    out = merge_flow(str(path), merges=["tiny-mergealign-interp-l0.7"])
    assert list(out["merged"]) == ["tiny-mergealign-interp-l0.7"]
    merged = Path(out["merged"]["tiny-mergealign-interp-l0.7"])
    assert (merged / "model.safetensors").is_file() and (merged / "manifest.json").is_file()
    with pytest.raises(ConfigError, match="merges: no merge 'nope'"):
        merge_flow(str(path), merges=["nope"])
