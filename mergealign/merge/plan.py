"""Everything decided before the first tensor of a merge is read: the validated config, the method, the opened
inputs, the preflight result, the shard plan, the compute device and the config hash. Writes nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergealign.checkpoint import TOKENIZER_FILES, dtype_from_name
from mergealign.devices import resolve_device
from mergealign.merge.config import MergeConfig, load_merge_config
from mergealign.merge.inputs import MergeInput, find_input, open_inputs
from mergealign.preflight import Input, PreflightResult, preflight
from mergealign.shards import ShardPlan, plan_shards
from mergealign.writer import PROGRESS_FILE

ENGINE_VERSION = 1  # part of the config hash: bump when the bytes an identical config produces change


@dataclass
class MergePlan:
    """Everything decided before the first tensor is read."""

    config: MergeConfig
    method: Any
    base: MergeInput | None
    models: list[MergeInput]
    preflight: PreflightResult
    shards: list[ShardPlan]
    out_dir: Path
    device: torch.device
    config_hash: str
    cast_dtype: torch.dtype | None
    n_layers: int | None
    files_source: MergeInput
    tokenizer_source: MergeInput
    input_hashes: Mapping[str, str] | None = None

    @property
    def reference(self) -> MergeInput:
        return self.base if self.base is not None else self.models[0]


def _extra_file_bytes(src: MergeInput, tok: MergeInput) -> int:
    total = 64 << 10  # config, card, index, progress
    for name in TOKENIZER_FILES:
        p = tok.path / name
        if p.exists():
            total += p.stat().st_size
    return total


def _peek_finished_bytes(out_dir: Path, config_hash: str) -> int:
    p = out_dir / PROGRESS_FILE
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    if data.get("config_hash") != config_hash:
        return 0
    return sum(int(r.get("bytes", 0)) for r in (data.get("shards") or {}).values())


def plan_merge(
    config: MergeConfig | str | os.PathLike[str] | Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    device: str | None = None,
    input_hashes: Mapping[str, str] | None = None,
) -> MergePlan:
    """Load and validate the config, open inputs from headers, run preflight, plan shards. Writes nothing."""
    cfg = load_merge_config(config)
    from mergealign.methods import get_method

    method = get_method(cfg.merge_method)
    dev = resolve_device(device if device is not None else cfg.device)
    base, models = open_inputs(cfg)
    out = Path(out_dir)
    ref = base if base is not None else models[0]
    files_source = find_input(cfg.files_source(), cfg, base, models) or ref
    tok_ref = cfg.vocab_source if cfg.vocab_policy == "merge_shared" else cfg.tokenizer_ref
    tokenizer_source = find_input(tok_ref, cfg, base, models) or files_source
    cast = dtype_from_name(cfg.dtype) if cfg.dtype else None
    out_dtype = dtype_from_name(cfg.out_dtype) if cfg.out_dtype else cast

    ids = {m.spec: m.identity(input_hashes) for m in ([base] if base else []) + models}
    config_hash = cfg.config_hash({"inputs": ids, "engine": ENGINE_VERSION, "device": dev.type})
    inputs = []
    if base is not None:
        inputs.append(Input(base.label, base.checkpoint))
    for m in models:
        fp = (m.vector_meta.get("base") or {}).get("fingerprint") if m.kind == "vector" else None
        inputs.append(Input(m.label, m.checkpoint, is_vector=m.kind == "vector", base_fingerprint=fp))
    vocab_label = None
    if cfg.vocab_source is not None:
        src = find_input(cfg.vocab_source, cfg, base, models)
        vocab_label = src.label if src else cfg.vocab_source
    result = preflight(
        inputs,
        out_dir=out,
        cast_dtype=cast,
        out_dtype=out_dtype,
        vocab_policy=cfg.vocab_policy,
        vocab_source=vocab_label,
        finished_bytes=_peek_finished_bytes(out, config_hash),
        extra_bytes=_extra_file_bytes(files_source, tokenizer_source),
    )
    shards = plan_shards(result.tensors, cfg.shard_bytes)
    n_layers = (ref.checkpoint.config.get("text_config") or ref.checkpoint.config).get("num_hidden_layers")
    return MergePlan(
        cfg,
        method,
        base,
        models,
        result,
        shards,
        out,
        dev,
        config_hash,
        cast,
        n_layers,
        files_source,
        tokenizer_source,
        input_hashes,
    )
