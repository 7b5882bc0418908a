"""A run killed during a merge resumes the merge (engine resume) with the rest cached; two runs of the same
config at once compute each step once and end with the same artifacts. Real subprocesses, real kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flows.study import mergealign_study
from mergealign.writer import PROGRESS_FILE
from tests.helpers.study import PYTHON, REPO, states, study_config, subprocess_env, write_config

pytestmark = pytest.mark.slow


def _small_config(root: Path, zoo) -> dict:
    cfg = study_config(root, zoo, merges=[{"method": "mergealign", "lambda": 0.5, "shard_size": "2M"}])
    cfg["analysis"] = {"similarity": False, "report": False}
    return cfg


def _finished_shards(root: Path) -> int:
    best = 0
    for prog in (root / "artifacts" / "merge" / ".staging").glob(f"*/{PROGRESS_FILE}"):
        try:
            best = max(best, len(json.loads(prog.read_text()).get("shards") or {}))
        except (OSError, ValueError):
            continue
    return best


def test_run_killed_during_merge_resumes_the_merge(prefect_api, small_zoo, tmp_path):
    from mergealign.merge import run_merge

    path = write_config(tmp_path / "study.yaml", _small_config(tmp_path, small_zoo))
    proc = subprocess.Popen([PYTHON, "-m", "cli", "run", str(path)], cwd=REPO, env=subprocess_env(prefect_api),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while _finished_shards(tmp_path) < 1:
            assert proc.poll() is None, "the run ended before any shard was written"
            assert time.monotonic() < deadline, "no merge shard finished in time"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-merge: at least one shard done, the merge not finished
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    merge_dir = tmp_path / "artifacts" / "merge"
    assert not list(merge_dir.glob("*/manifest.json")), (
        "the merge finished before the kill; nothing to resume"
    )

    summary = mergealign_study(str(path))
    st = states(summary)
    assert st[("merge", "tiny-mergealign-interp-l0.5")] == "Completed"
    assert all(v == "Cached" for (step, _), v in st.items() if step in ("models", "preflight"))
    merged = Path(next(s["location"] for s in summary["steps"] if s["step"] == "merge"))
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["metrics"]["shards_resumed"] >= 1
    # byte-identical to an uninterrupted merge of the same config
    from mergealign.study.merges import engine_config

    folders = {
        "base": str(small_zoo.base),
        "expert": str(small_zoo.expert),
        "aligned": str(small_zoo.aligned),
    }
    ref = tmp_path / "reference"
    run_merge(engine_config(manifest["extra"]["spec"], folders), ref, device="cpu", progress=False)
    shards = sorted(p.name for p in merged.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in ref.glob("*.safetensors"))
    for name in shards:
        assert (merged / name).read_bytes() == (ref / name).read_bytes(), name


def test_two_runs_at_once_compute_each_step_once(prefect_api, small_zoo, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

    path = write_config(tmp_path / "study.yaml", _small_config(tmp_path, small_zoo))
    env = subprocess_env(prefect_api)
    procs = [subprocess.Popen([PYTHON, "-m", "cli", "run", str(path)], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for _ in range(2)]  # fmt: skip
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            outputs.append(out)
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    names = [
        line.split("'")[1] for out in outputs for line in out.splitlines() if "Beginning flow run '" in line
    ]
    assert len(names) == 2, outputs
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))
        ids = [r.id for r in runs]
        assert len(ids) == 2 and all(r.state.is_completed() for r in runs)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    by_name: dict[str, list[str]] = {}
    for tr in task_runs:
        by_name.setdefault(tr.name, []).append(tr.state.name)
    assert set(by_name) == {"preflight-models", "models-base", "models-aligned", "models-expert:tiny",
                            "merge-tiny-mergealign-interp-l0.5"}  # fmt: skip
    for name, sts in by_name.items():  # each step computed by one run, taken from the cache by the other
        assert sorted(sts) == ["Cached", "Completed"], (name, sts)
    merge_dirs = [p for p in (tmp_path / "artifacts" / "merge").iterdir() if not p.name.startswith(".")]
    assert len(merge_dirs) == 1 and (merge_dirs[0] / "manifest.json").is_file()
