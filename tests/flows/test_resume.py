"""Resume semantics of the study flow, each on a real Prefect API and real tiny checkpoints:
repeat -> all cached; λ change -> only that merge and downstream; corrupt artifact -> recomputed;
failed step + retry of the flow run -> only the failed step and downstream; bad inputs fail before weights."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from flows.study import mergealign_study
from mergealign.errors import MergeAlignError
from tests.helpers.study import PYTHON, REPO, states, study_config, subprocess_env, write_config

MERGE_03 = ("merge", "tiny-mergealign-interp-l0.3")
MERGE_07 = ("merge", "tiny-mergealign-interp-l0.7")


@pytest.fixture(scope="module")
def finished_study(prefect_api, tiny_zoo, tmp_path_factory):
    """One finished study (two merges + similarity), shared by the tests that re-run it."""
    root = tmp_path_factory.mktemp("study")
    path = write_config(root / "study.yaml", study_config(root, tiny_zoo))
    first = mergealign_study(str(path))
    return root, path, first


def test_first_run_computes_every_step_and_publishes_artifacts(finished_study):
    root, _, first = finished_study
    st = states(first)
    assert st == {
        ("preflight", "models"): "Completed",
        ("models", "base"): "Completed",
        ("models", "aligned"): "Completed",
        ("models", "expert:tiny"): "Completed",
        MERGE_03: "Completed",
        MERGE_07: "Completed",
        ("similarity", "tiny"): "Completed",
    }
    art = root / "artifacts"
    merged = [s for s in first["steps"] if s["step"] == "merge"]
    for s in merged:
        manifest = json.loads((Path(s["location"]) / "manifest.json").read_text())
        assert Path(s["location"]).parent == art / "merge"
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= {
            f["path"] for f in manifest["files"]
        }
    # Prefect records and locks live under the artifact root, never in ~/.prefect
    assert any((art / ".prefect" / "results").iterdir())
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="merge-tiny-"))
        )
    assert {a.key for a in arts} >= {"merge-tiny-mergealign-interp-l0-3", "merge-tiny-mergealign-interp-l0-7"}
    assert all("Merge tiny-mergealign" in (a.data or "") for a in arts)


def test_second_run_is_all_cached_and_fast(finished_study):
    _, path, _ = finished_study
    t0 = time.monotonic()
    second = mergealign_study(str(path))
    elapsed = time.monotonic() - t0
    assert set(states(second).values()) == {"Cached"}, states(second)
    assert elapsed < 15, f"a fully cached run took {elapsed:.1f} s"


def test_lambda_change_reruns_only_that_merge_and_downstream(finished_study, tmp_path):
    root, _, first = finished_study
    cfg = study_config(
        root, _zoo_of(first), merges=[{"method": "mergealign", "preset": "interp", "lambda": [0.3, 0.6]}]
    )
    path = write_config(tmp_path / "changed.yaml", cfg)
    st = states(mergealign_study(str(path)))
    assert st[MERGE_03] == "Cached"
    assert st[("merge", "tiny-mergealign-interp-l0.6")] == "Completed"
    assert st[("similarity", "tiny")] == "Completed"  # downstream of the changed merge
    assert all(v == "Cached" for (step, _), v in st.items() if step in ("models", "preflight"))


def test_corrupt_artifact_is_recomputed_not_trusted(finished_study):
    root, path, first = finished_study
    loc = Path(next(s["location"] for s in first["steps"] if (s["step"], s["label"]) == MERGE_07))
    weights = loc / "model.safetensors"
    good = weights.read_bytes()
    data = bytearray(good)
    data[-1] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(data))
    st = states(mergealign_study(str(path)))
    assert st[MERGE_07] == "Completed"
    assert st[MERGE_03] == "Cached"
    # the engine is deterministic: the recomputed model is byte-identical, so its dependants stay cached
    assert weights.read_bytes() == good
    assert st[("similarity", "tiny")] == "Cached"


def _zoo_of(summary):
    from types import SimpleNamespace

    loc = {s["label"]: s["location"] for s in summary["steps"] if s["step"] == "models"}
    return SimpleNamespace(base=loc["base"], aligned=loc["aligned"], expert=loc["expert:tiny"])


def test_failed_step_then_retry_of_the_flow_run(prefect_api, tiny_zoo, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    path = write_config(tmp_path / "study.yaml", study_config(tmp_path, tiny_zoo))
    art = tmp_path / "artifacts"
    art.mkdir()
    (art / "merge").write_text("a file where the merge step wants its folder")  # the injected failure
    state = mergealign_study(str(path), return_state=True)
    assert state.is_failed()
    flow_run_id = state.state_details.flow_run_id
    with pytest.raises(MergeAlignError, match="merge tiny-mergealign-interp-l0.3: Failed"):
        state.result()
    models_manifest = next((art / "models").glob("*/manifest.json"))
    before = models_manifest.read_text()
    (art / "merge").unlink()  # fix the cause, then retry the same flow run (same id) as a user would
    retry_started = time.time()
    proc = subprocess.run(
        [str(Path(PYTHON).parent / "prefect"), "flow-run", "retry", str(flow_run_id),
         "--entrypoint", "flows/study.py:mergealign_study"],
        cwd=REPO, env=subprocess_env(prefect_api), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert run.state.is_completed()
    latest = {}
    for tr in sorted(task_runs, key=lambda t: t.created):
        if tr.created.timestamp() >= retry_started - 1:
            latest[tr.name] = tr.state.name
    assert latest["models-base"] == latest["models-aligned"] == latest["models-expert:tiny"] == "Cached"
    assert latest["preflight-models"] == "Cached"
    assert (
        latest["merge-tiny-mergealign-interp-l0.3"]
        == latest["merge-tiny-mergealign-interp-l0.7"]
        == "Completed"
    )
    assert latest["similarity-tiny"] == "Completed"
    assert models_manifest.read_text() == before  # not recomputed


def test_models_that_do_not_fit_fail_in_preflight_before_any_merge(prefect_api, tiny_zoo, tmp_path):
    from mergealign.zoo_tiny import build_model

    qwen = build_model(tmp_path / "qwen-expert", arch="qwen2", seed=5)
    cfg = study_config(tmp_path, tiny_zoo)
    cfg["models"]["experts"] = [{"name": "tiny", "path": str(qwen)}]
    with pytest.raises(MergeAlignError) as err:
        mergealign_study(write_config(tmp_path / "bad.yaml", cfg).as_posix())
    text = str(err.value)
    assert "preflight" in text and "architectures differ" in text and "expert:tiny" in text
    assert not (tmp_path / "artifacts" / "merge").exists()
    assert not (tmp_path / "artifacts" / "models").exists()  # no model was fetched
