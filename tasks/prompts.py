"""Step `prompts`: a prompt set resolved (named set or local file), sampled with a seed, as canonical JSONL."""

from __future__ import annotations

from typing import Any

from prefect import task

from mergealign.artifacts import Manifest, library_versions, sha256_file, step_key
from mergealign.config import PromptSetEntry
from tasks.common import ArtifactCachePolicy, StepContext, publish_markdown, run_step

STEP = "prompts"
CODE_VERSION = "prompts-1"
FILE = "prompts.jsonl"


def prompts_key(entry: PromptSetEntry, local_path: str | None) -> str:
    shas = {"file": sha256_file(local_path)} if local_path else {}
    params = entry.model_dump(exclude={"path"}, exclude_none=True)
    return step_key(STEP, shas=shas, params=params, code_version=CODE_VERSION)


def _key(inputs: dict[str, Any]) -> str:
    return prompts_key(inputs["entry"], inputs["local_path"])


@task(
    name="prompts",
    cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key),
    task_run_name="prompts-{entry.label}",
)
def prompts_task(ctx: StepContext, entry: PromptSetEntry, local_path: str | None = None) -> Manifest:
    """Write `n` prompts of a set (sampled with `seed`) to prompts.jsonl."""
    from mergealign.datasets import PromptSetSpec, write_prompt_set

    key = prompts_key(entry, local_path)

    def build(staging):
        fields = entry.spec_fields()
        if local_path:
            fields["path"] = local_path
        summary = write_prompt_set(PromptSetSpec(**fields), staging / FILE, n=entry.n, seed=entry.seed)
        return {"metrics": {"prompts": summary.n_written, "available": summary.n_available},
                "extra": {"source": summary.source, "categories": summary.categories}}  # fmt: skip

    manifest = run_step(ctx, STEP, key, build, params={"label": entry.label, **entry.model_dump(exclude_none=True)},
                        code_version=CODE_VERSION, versions=library_versions(("mergealign", "datasets")))  # fmt: skip
    publish_markdown(manifest, f"Prompt set {entry.label}", label=entry.label)
    return manifest
