"""The whole demo as one Prefect flow (`mergealign demo`).

    packages and headroom checked (only when the zoo still has to be built)
      └─ study (configs/demo.yaml) ─ demo zoo (subflow, cached steps) ─ merges ─ answers ─ ... ─ report
           └─ findings: what the numbers say about MergeAlign at this scale, in plain words

The findings (mergealign.demo.findings, step tasks/findings.py) are computed from the report's own result files,
never written by hand: whether MergeAlign keeps the expert's knowledge and the aligned model's safety is decided
by the measured numbers, whichever way they go.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow

from mergealign.demo.zoo_steps import zoo_is_complete
from mergealign.devices import share_cores
from mergealign.errors import ConfigError
from mergealign.study import load_config
from tasks.runtime import run_logger

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@flow(name="mergealign-demo", log_prints=True)
def mergealign_demo(config: str = str(DEFAULT_CONFIG), install_missing: bool = True,
                    workers: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Build the demo zoo if needed, run the study of `config` on it, and state what the numbers show."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.study import mergealign_study

    started = time.time()
    logger = run_logger()
    cfg = load_config(config)
    if cfg.zoo_demo is None:
        raise ConfigError(["zoo_demo: the demo config needs a `zoo_demo: {dir: ...}` section"], config)
    zoo_dir = Path(cfg.zoo_demo.dir)
    if not zoo_is_complete(zoo_dir, external_base=cfg.zoo_demo.base is not None):
        from mergealign.demo import check_resources, ensure_demo_packages

        logger.info(
            "the demo zoo under %s is not complete: building it (about 10 minutes on 2 cores)", zoo_dir
        )
        ensure_demo_packages(install=install_missing)  # a clear message (what to install) if it cannot
        check_resources(zoo_dir)
    max_workers = workers or cfg.execution.max_workers
    logger.info(
        "%d steps at once, %d torch thread(s) each in child processes", max_workers, share_cores(max_workers)
    )
    runner = ThreadPoolTaskRunner(max_workers=max_workers)
    study = mergealign_study.with_options(task_runner=runner)(config=str(Path(config).resolve()))
    out: dict[str, Any] = {"study": study, "report": study.get("report"), "findings": None}
    found = next((s for s in study["steps"] if s["step"] == "findings"), None)
    if found is not None:
        out["findings"] = str(Path(found["location"]) / "findings.md")
        out["findings_text"] = Path(out["findings"]).read_text()
    out["seconds"] = round(time.time() - started, 1)
    return out
