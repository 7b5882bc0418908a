"""Step `merge`: one merged model per planned merge (entry × expert × λ, or a contribution variant), by the
streaming engine (mergealign.merge).

The output is built in the step's deterministic staging folder, so a merge killed mid-way resumes there (the
engine keeps finished shards), then published to `<root>/merge/<key>/`: a normal Hugging Face model folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergealign.checkpoint import Checkpoint
from mergealign.merge import ENGINE_VERSION, run_merge
from mergealign.study import merges
from tasks.steps import StepKind, StepRun, register

TRIO = ("base", "expert", "aligned")


def _build(run: StepRun, staging: Path) -> dict[str, Any]:
    step, ctx = run.step, run.ctx
    folders = {role: str(run.dir(role)) for role in TRIO}
    names = n_layers = None
    if step.params.get("scope"):  # a contribution variant: its part is read from the base model's headers
        ck = Checkpoint(folders["base"])
        names = list(ck.tensors)
        n_layers = (ck.config.get("text_config") or ck.config).get("num_hidden_layers")
    cfg, variant = merges.resolve(step.params, folders, tensor_names=names, n_layers=n_layers)
    hashes = {folders[role]: run.manifest(role).content_hash for role in TRIO}
    run.logger.info("merging %s (%s) into %s", step.name, step.params["method"], staging)
    summary = run_merge(cfg, staging, device=ctx.device, progress=True, input_hashes=hashes)
    run.logger.info("%s", summary.line())
    report = step.info.get("report") or {}
    return {
        "metrics": {
            "method": step.params["method"],
            **{k: report.get(k) for k in ("lambda", "lambda_domain", "lambda_alignment") if k in report},
            "tensors": summary.n_tensors_total,
            "shards_resumed": summary.shards_skipped,
            "bytes_written": summary.bytes_written,
            "merge_seconds": round(summary.wall_s, 3),
            "peak_rss_anon_mib": round(summary.peak_rss_anon_bytes / 2**20, 1),
            "device": summary.device,
        },
        "extra": {
            "spec": dict(step.params),
            "template": merges.template(step.params),
            "variant": variant,
            "engine_config_hash": summary.config_hash,
        },  # fmt: skip
    }


MERGE = register(StepKind(
    "merge", f"merge-2-engine{ENGINE_VERSION}", build=_build, title=lambda step: f"Merge {step.name}",
    manifest_params=lambda step: {"id": step.name, **step.params}, uses_gpu=lambda step: True,
    versions=("mergealign", "torch", "safetensors"), remote=lambda step: {"merges": [step.name]},
))  # fmt: skip
