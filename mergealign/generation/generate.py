"""`generate`: answers of one model to a prompt file, as JSONL, in a child process, resumable.

Output row (one per prompt, in prompt-file order): every field of the prompt row (id, prompt, category,
prompt_set, kind, ...) plus rendered_prompt, response, finish_reason ("stop" | "length"), prompt_tokens,
completion_tokens, [response_token_ids], model, backend, chat_template ("model" or where the configured
template came from), chat_template_sha256, generation_fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mergealign.datasets import read_prompt_file
from mergealign.files import (
    canonical_json,
    read_complete_jsonl_rows,
    sha256_file,
    write_jsonl,
)
from mergealign.generation.runner import discard_partial, run_model
from mergealign.generation.settings import GenerationSettings
from mergealign.generation.templates import resolve_chat_template

logger = logging.getLogger(__name__)

WORKER_FIELDS = ("rendered_prompt", "response", "finish_reason", "prompt_tokens", "completion_tokens")


@dataclass
class GenerationSummary:
    out_path: str
    model: str
    backend: str
    n_prompts: int
    n_generated: int  # by this call's worker
    n_resumed: int  # taken over from a killed earlier run
    skipped: bool  # the output already existed with the same fingerprint
    completion_tokens: int  # over all rows of the output
    tokens_per_second: float | None  # this call's worker (None when nothing was generated)
    seconds: float
    chat_template: str
    fingerprint: str
    python: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_identity(model: str | os.PathLike[str]) -> dict[str, Any]:
    """Cheap identity of a model for resume keys: config hash plus weight file names and sizes."""
    path = Path(model)
    if not path.is_dir():
        return {"hub_id": str(model)}
    files = {p.name: p.stat().st_size for p in sorted(path.glob("*.safetensors"))}
    files.update({p.name: p.stat().st_size for p in sorted(path.glob("*.bin"))})
    config = path / "config.json"
    return {
        "path": str(path.resolve()),
        "config_sha256": sha256_file(config) if config.exists() else None,
        "weights": files,
    }


def _fingerprint(model: str, prompts_sha: str, settings: GenerationSettings, template_sha: str) -> str:
    payload = {
        "model": model_identity(model),
        "prompts": prompts_sha,
        "settings": settings.cache_fingerprint(),
        "chat_template": template_sha,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def _existing_output(out_path: Path, ids: list[str], fingerprint: str) -> list[dict[str, Any]] | None:
    if not out_path.is_file():
        return None
    rows = read_complete_jsonl_rows(out_path)
    if [str(r.get("id")) for r in rows] == ids and all(
        r.get("generation_fingerprint") == fingerprint for r in rows
    ):
        return rows
    logger.info("%s exists but from other inputs or settings: generating again", out_path)
    return None


def generate(
    model: str | os.PathLike[str],
    prompts_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    settings: GenerationSettings | None = None,
) -> GenerationSummary:
    """Generate one answer per prompt of `prompts_path` (canonical prompt JSONL) into `out_path`."""
    settings = settings or GenerationSettings()
    model = str(model)
    out = Path(out_path)
    prompts = read_prompt_file(prompts_path)
    template = resolve_chat_template(model, settings.chat_template, settings.runtime.trust_remote_code)
    fingerprint = _fingerprint(model, sha256_file(prompts_path), settings, template.sha256)
    ids = [p["id"] for p in prompts]

    existing = _existing_output(out, ids, fingerprint)
    if existing is not None:
        logger.info("generate: %s is complete, nothing to do", out)
        return GenerationSummary(
            out_path=str(out),
            model=model,
            backend=settings.runtime.backend,
            n_prompts=len(prompts),
            n_generated=0,
            n_resumed=0,
            skipped=True,
            completion_tokens=sum(int(r.get("completion_tokens", 0)) for r in existing),
            tokens_per_second=None,
            seconds=0.0,
            chat_template=template.source,
            fingerprint=fingerprint,
            python=None,
        )

    inputs = []
    for prompt in prompts:
        messages = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
        messages.append({"role": "user", "content": prompt["prompt"]})
        inputs.append({"id": prompt["id"], "messages": messages})
    sampling = {
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "seed": settings.seed,
        "ignore_eos": settings.ignore_eos,
        "record_token_ids": settings.record_token_ids,
        "score_tokens": None,
    }
    result = run_model(
        model=model,
        inputs=inputs,
        out_path=out,
        fingerprint=fingerprint,
        runtime=settings.runtime,
        sampling=sampling,
        chat_template=template.text,
        label=f"generate {out.name}",
    )
    rows = []
    for prompt in prompts:
        produced = result.rows[prompt["id"]]
        row = dict(prompt)
        row.update({k: produced[k] for k in WORKER_FIELDS})
        if settings.record_token_ids:
            row["response_token_ids"] = produced.get("response_token_ids")
        row.update(
            {
                "model": model,
                "backend": settings.runtime.backend,
                "chat_template": template.source,
                "chat_template_sha256": template.sha256,
                "generation_fingerprint": fingerprint,
            }
        )
        rows.append(row)
    write_jsonl(out, rows)
    discard_partial(out, fingerprint)
    tokens_per_second = result.stats.get("tokens_per_second")
    logger.info(
        "generate: %d answers in %s (%d resumed), %s tokens/s",
        len(rows),
        out,
        result.n_resumed,
        f"{tokens_per_second:.1f}" if tokens_per_second else "n/a",
    )
    return GenerationSummary(
        out_path=str(out),
        model=model,
        backend=settings.runtime.backend,
        n_prompts=len(prompts),
        n_generated=result.n_new,
        n_resumed=result.n_resumed,
        skipped=False,
        completion_tokens=sum(int(r["completion_tokens"]) for r in rows),
        tokens_per_second=tokens_per_second,
        seconds=result.seconds,
        chat_template=template.source,
        fingerprint=fingerprint,
        python=result.python,
    )
