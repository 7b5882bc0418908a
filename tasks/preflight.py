"""Step `preflight`: the engine's preflight on every (base, expert, aligned) trio, from headers only.

Runs before any weights are downloaded: for hub models it reads config.json and the safetensors index (a few
KB) and the tensor headers through the hub API, so models that do not share an architecture, tensor names,
shapes or vocabulary are rejected without fetching gigabytes.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from mergealign import hub
from mergealign.artifacts import Manifest, atomic_write_text, library_versions, step_key
from mergealign.checkpoint import Checkpoint
from mergealign.errors import PreflightError
from mergealign.preflight import Input, preflight
from tasks.common import ArtifactCachePolicy, StepContext, hf_token, publish_markdown, run_logger, run_step
from tasks.models import ResolvedSource

STEP = "preflight"
CODE_VERSION = "preflight-1"


def preflight_key(sources: dict[str, ResolvedSource]) -> str:
    ids = {label: f"{s.kind}:{s.repo_id or s.path}:{s.identity}" for label, s in sorted(sources.items())}
    return step_key(STEP, shas=ids, params={"trios": sorted(k for k in sources if k.startswith("expert:"))},
                    code_version=CODE_VERSION)  # fmt: skip


def _key(inputs: dict[str, Any]) -> str:
    return preflight_key(inputs["sources"])


def _open(ctx: StepContext, label: str, source: ResolvedSource, token: str | None) -> Checkpoint:
    if source.kind == "local":
        return Checkpoint(source.path or "", label=label)
    ref = hub.ResolvedRef(repo_id=source.repo_id or "", revision=source.revision, sha=source.sha or "")
    return hub.header_checkpoint(ref, token=token, cache_dir=ctx.hf_cache_dir, label=label)


@task(
    name="preflight",
    cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key),
    task_run_name="preflight-models",
)
def preflight_models(ctx: StepContext, sources: dict[str, ResolvedSource]) -> Manifest:
    """Check that base, aligned and each expert fit together (engine preflight); nothing is downloaded but
    configs and headers. Raises PreflightError listing every problem."""
    logger = run_logger()
    key = preflight_key(sources)

    def build(staging):
        token = hf_token(ctx) if any(s.kind == "hub" for s in sources.values()) else None
        cks = {label: _open(ctx, label, src, token) for label, src in sources.items()}
        problems: list[str] = []
        experts = sorted(label for label in cks if label.startswith("expert:"))
        for label in experts:
            try:
                preflight(
                    [Input("base", cks["base"]), Input(label, cks[label]), Input("aligned", cks["aligned"])]
                )
            except PreflightError as exc:
                problems += [f"{label}: {p}" for p in exc.problems]
        if problems:
            raise PreflightError(problems)
        report = {label: {"architectures": ck.architectures, "tensors": len(ck.tensors), "vocab_size": ck.vocab_size,
                          "bytes": ck.total_bytes} for label, ck in cks.items()}  # fmt: skip
        import json

        atomic_write_text(staging / "preflight.json", json.dumps(report, indent=2))
        arch = {",".join(ck.architectures) for ck in cks.values()}
        return {"metrics": {"models": len(cks), "architecture": ",".join(sorted(arch)),
                            "tensors": len(cks["base"].tensors)}}  # fmt: skip

    manifest = run_step(ctx, STEP, key, build, shas={k: s.identity for k, s in sources.items()},
                        code_version=CODE_VERSION, versions=library_versions(("mergealign",)))  # fmt: skip
    logger.info("preflight: %s fit together", ", ".join(sorted(sources)))
    publish_markdown(manifest, "Preflight: inputs fit together", label="models")
    return manifest
