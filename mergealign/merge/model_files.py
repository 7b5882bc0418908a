"""The files that make a merge's output a Hugging Face model directory: config.json (patched dtype and vocab
size), the tokenizer files, the chat template, generation_config.json, and a README.md model card."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import yaml

import mergealign
from mergealign.checkpoint import FLOAT_CODES, GENERATION_CONFIG, ST_DTYPES, TOKENIZER_FILES
from mergealign.errors import MergeAlignError
from mergealign.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from mergealign.merge.config import BUILTIN_CHAT_TEMPLATES
from mergealign.merge.inputs import find_input
from mergealign.merge.params import resolve_params
from mergealign.merge.plan import MergePlan
from mergealign.shards import OutTensor


def _out_dtype_name(tensors: Sequence[OutTensor]) -> str | None:
    codes = {t.dtype for t in tensors if t.dtype in FLOAT_CODES}
    if len(codes) != 1:
        return None
    return str(ST_DTYPES[codes.pop()]).removeprefix("torch.")


def _chat_template(plan: MergePlan) -> tuple[str | None, str]:
    """(template text or None to keep the tokenizer source's, description)."""
    ct = plan.config.chat_template
    if ct is None or ct == "auto":
        return None, "from the tokenizer source"
    if ct in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[ct], f"built-in {ct}"
    src = find_input(ct, plan.config, plan.base, plan.models)
    if src is not None:
        p = src.path / "chat_template.jinja"
        if p.exists():
            return p.read_text(), f"copied from {src.label}"
        cfg_path = src.path / "tokenizer_config.json"
        if cfg_path.exists():
            text = json.loads(cfg_path.read_text()).get("chat_template")
            if isinstance(text, str):
                return text, f"copied from {src.label}"
        raise MergeAlignError(f"chat_template: {ct!r} has no chat template")
    return ct, "given in the config"


def write_model_files(plan: MergePlan) -> None:
    """config.json (patched), tokenizer files, chat template, generation_config.json, README.md model card."""
    out = plan.out_dir
    config = json.loads(json.dumps(plan.files_source.checkpoint.config))  # deep copy
    if not config.get("architectures"):
        for inp in ([plan.base] if plan.base else []) + plan.models:
            if inp.checkpoint.architectures:
                config["architectures"] = inp.checkpoint.architectures
                break
    dtype_name = _out_dtype_name(plan.preflight.tensors)
    if dtype_name:
        config["dtype"] = dtype_name
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name
    if plan.preflight.vocab_size is not None:
        target = config.get("text_config", config)
        target["vocab_size"] = plan.preflight.vocab_size
    atomic_write_json(out / "config.json", config, ensure_ascii=True)

    template, _ = _chat_template(plan)
    for name in TOKENIZER_FILES:
        src = plan.tokenizer_source.path / name
        if not src.exists():
            continue
        data = src.read_bytes()
        if template is not None and name == "tokenizer_config.json":
            tok_cfg = json.loads(data)
            if "chat_template" in tok_cfg:
                tok_cfg["chat_template"] = template
                data = (json.dumps(tok_cfg, indent=2) + "\n").encode()
        if template is not None and name in ("chat_template.jinja", "chat_template.json"):
            continue
        atomic_write_bytes(out / name, data)
    if template is not None:
        atomic_write_text(out / "chat_template.jinja", template)
    gen = plan.files_source.path / GENERATION_CONFIG
    if gen.exists():
        atomic_write_bytes(out / GENERATION_CONFIG, gen.read_bytes())
    atomic_write_text(out / "README.md", model_card(plan))


def model_card(plan: MergePlan) -> str:
    cfg = plan.config
    method = plan.method
    hub = [i.spec for i in ([plan.base] if plan.base else []) + plan.models if i.commit]
    tags = ["merge", "mergealign"] + ([cfg.merge_method] if cfg.merge_method != "mergealign" else [])
    front: dict[str, Any] = {"library_name": "transformers", "tags": tags}
    if plan.base is not None and plan.base.commit:
        front["base_model"] = plan.base.spec
    elif hub:
        front["base_model"] = hub
    rows = []
    for inp in ([plan.base] if plan.base else []) + plan.models:
        kind = (
            "base"
            if inp.kind == "base"
            else ("task vector" if inp.kind == "vector" else (inp.role or "model"))
        )
        rows.append(f"| {kind} | `{inp.spec}` | {inp.identity(plan.input_hashes)} |")
    globals_ = resolve_params(plan.config.method_inputs(method)[0], "", plan.n_layers)
    try:
        resolved = method.resolved_globals(globals_)
    except Exception:  # a card must not fail a finished merge
        resolved = globals_
    given = cfg.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    template_note = _chat_template(plan)[1]
    parts = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        "# Merged model",
        "",
        f"Merged with mergealign {mergealign.__version__}, method `{cfg.merge_method}`: {getattr(method, 'formula', '')}",
        "",
        "## Inputs",
        "",
        "| role | model | identity |",
        "|---|---|---|",
        *rows,
        "",
        "## Parameters",
        "",
        "Resolved global parameters: `" + json.dumps(resolved, sort_keys=True, default=str) + "`",
        "",
        "Configuration as given:",
        "",
        "```yaml",
        yaml.safe_dump(given, sort_keys=False).strip(),
        "```",
        "",
        "## Output",
        "",
        f"- tensors: {len(plan.preflight.tensors)} in {len(plan.shards)} shard(s), dtype "
        f"{_out_dtype_name(plan.preflight.tensors) or 'mixed'}",
        f"- config, generation config from `{plan.files_source.spec}`; tokenizer from `{plan.tokenizer_source.spec}`; "
        f"chat template {template_note}",
        f"- seed {cfg.seed}; config hash `{plan.config_hash}`",
        "",
    ]
    return "\n".join(parts)
