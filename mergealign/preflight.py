"""Preflight: check that merge inputs fit together, from headers and configs only, before any tensor is read.

Every problem is collected and reported at once (PreflightError), naming the tensor and the models:
names, shapes, dtypes, architecture / model_type, tie_word_embeddings, vocabulary rows, task-vector bases,
and free disk for the output. Nothing is written before preflight passes.

Vocabulary policy (explicit, never silent truncation):
- "error" (default): any difference in embedding / LM-head rows or config vocab_size is an error.
- "merge_shared": the rows all inputs share (the first min(rows) rows) are merged; the output has the rows
  of `vocab_source`, whose extra rows are copied unmerged; its config vocab_size and tokenizer are used.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergealign.checkpoint import FLOAT_CODES, TORCH_TO_ST, Checkpoint, dtype_size
from mergealign.errors import PreflightError
from mergealign.shards import OutTensor
from mergealign.tensor_names import TIED_HEADS, is_vocab_tensor

log = logging.getLogger(__name__)

MAX_LISTED = 25  # per kind of problem; the rest are counted, so a wholesale mismatch stays readable
VOCAB_POLICIES = ("error", "merge_shared")


@dataclass(frozen=True)
class Input:
    """One merge input as preflight sees it. `label` names it in messages ("base", "expert", a path...)."""

    label: str
    checkpoint: Checkpoint
    is_vector: bool = False  # a persisted task vector (its tensors are τ, shapes equal its base's)
    base_fingerprint: str | None = (
        None  # vectors: content_fingerprint() of the base they were computed against
    )


@dataclass(frozen=True)
class VocabRows:
    """How a vocabulary-indexed tensor is assembled under the merge_shared policy."""

    shared: int  # rows [0, shared) are merged
    out_rows: int  # output rows; rows [shared, out_rows) are copied from `source`
    source: str  # label of the input the extra rows (and tokenizer, vocab_size) come from


@dataclass
class PreflightResult:
    tensors: list[OutTensor]  # output tensors in write order, with output dtype and shape
    vocab_rows: dict[str, VocabRows] = field(default_factory=dict)  # only tensors whose rows differ
    vocab_size: int | None = None  # output config vocab_size
    dropped: list[str] = field(default_factory=list)  # tensors left out on purpose (tied lm_head)
    estimate_bytes: int = 0  # bytes still to write (tensors not in finished shards + other files)
    free_bytes: int | None = None


def _free_bytes(out_dir: Path) -> int | None:
    p = out_dir.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _cap(problems: list[str], kind: str) -> list[str]:
    if len(problems) <= MAX_LISTED:
        return problems
    return problems[:MAX_LISTED] + [f"... and {len(problems) - MAX_LISTED} more {kind} problem(s)"]


def _st_code(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return TORCH_TO_ST[dtype]
    return dtype


def preflight(
    inputs: Sequence[Input],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    cast_dtype: str | torch.dtype | None = None,
    out_dtype: str | torch.dtype | None = None,
    vocab_policy: str = "error",
    vocab_source: str | None = None,
    finished_bytes: int = 0,
    extra_bytes: int = 0,
) -> PreflightResult:
    """Check inputs (the first is the reference: the base, or the first model without one).

    cast_dtype: the config's `dtype` (inputs are cast to it, so differing input dtypes are allowed).
    out_dtype: output dtype (default: cast_dtype, else each tensor's reference dtype).
    finished_bytes: bytes of shards already finished in OUT (resume), not needed again.
    extra_bytes: other files to write (config, tokenizer, card).
    Raises PreflightError listing every problem.
    """
    if not inputs:
        raise PreflightError(["no inputs"])
    if vocab_policy not in VOCAB_POLICIES:
        raise PreflightError([f"vocab_policy {vocab_policy!r}: use one of {', '.join(VOCAB_POLICIES)}"])
    labels = [i.label for i in inputs]
    if vocab_policy == "merge_shared" and vocab_source not in labels:
        raise PreflightError(
            [f"vocab_source {vocab_source!r} is not one of the inputs ({', '.join(labels)})"]
        )
    cast_code, out_code = _st_code(cast_dtype), _st_code(out_dtype) or _st_code(cast_dtype)
    ref = inputs[0]
    models = [i for i in inputs if not i.is_vector]
    problems: list[str] = []

    # ---- architecture, model_type, tie_word_embeddings, config vocab_size
    for attr, what in (("architectures", "architectures"), ("model_type", "model_type")):
        values = {i.label: getattr(i.checkpoint, attr) for i in inputs if i.checkpoint.config}
        if len({repr(v) for v in values.values()}) > 1:
            problems.append(f"{what} differ: " + ", ".join(f"{k}: {v}" for k, v in values.items()))
    for i in models:
        if not i.checkpoint.config:
            problems.append(f"{i.label}: no config.json in {i.checkpoint.path}")
    ties = {i.label: i.checkpoint.tie_word_embeddings for i in inputs if i.checkpoint.config}
    if len(set(ties.values())) > 1:
        problems.append("tie_word_embeddings differ: " + ", ".join(f"{k}: {v}" for k, v in ties.items()))
    all_tied = bool(ties) and all(ties.values())
    vocab_sizes = {i.label: i.checkpoint.vocab_size for i in inputs if i.checkpoint.vocab_size is not None}

    # ---- tensor names (tied heads present in only some inputs are dropped: the output ties them)
    names = {i.label: set(i.checkpoint.tensors) for i in inputs}
    dropped: list[str] = []
    if all_tied:
        for head in TIED_HEADS:
            having = [lbl for lbl, n in names.items() if head in n]
            if having and len(having) < len(inputs):
                dropped.append(head)
                for n in names.values():
                    n.discard(head)
                log.info(
                    "%s is tied to the embeddings and absent from some inputs: left out of the output", head
                )
    if not all_tied and ties:
        for i in models:
            arch = " ".join(i.checkpoint.architectures)
            if "CausalLM" in arch and not any(n.startswith("lm_head") for n in names[i.label]):
                problems.append(f"{i.label}: no lm_head.weight although tie_word_embeddings is false")
    name_problems: list[str] = []
    ref_names = names[ref.label]

    def float_in_ref(n: str) -> bool:
        return ref.checkpoint.tensors[n].dtype in FLOAT_CODES

    def needed(i: Input, n: str) -> bool:  # task vectors hold float tensors only
        return not i.is_vector or float_in_ref(n)

    for i in inputs[1:]:
        for n in sorted(ref_names - names[i.label]):
            if needed(i, n):
                name_problems.append(f"tensor {n!r}: in {ref.label}, missing in {i.label}")
        for n in sorted(names[i.label] - ref_names):
            name_problems.append(f"tensor {n!r}: in {i.label}, not in {ref.label}")
    problems += _cap(name_problems, "tensor name")

    # ---- shapes, dtypes, vocabulary rows
    shape_problems: list[str] = []
    dtype_problems: list[str] = []
    vocab_problems: list[str] = []
    vocab_rows: dict[str, VocabRows] = {}
    ref_order = sorted(
        ref_names, key=lambda n: (ref.checkpoint.tensors[n].file, ref.checkpoint.tensors[n].offset, n)
    )
    common = [n for n in ref_order if all(n in names[i.label] or not needed(i, n) for i in inputs)]
    for n in common:
        infos = {i.label: i.checkpoint.tensors[n] for i in inputs if n in names[i.label]}
        shapes = {lbl: t.shape for lbl, t in infos.items()}
        if len(set(shapes.values())) > 1:
            rest = {s[1:] for s in shapes.values()}
            rows_only = len(rest) == 1 and all(len(s) >= 1 for s in shapes.values()) and is_vocab_tensor(n)
            if rows_only and vocab_policy == "merge_shared":
                rows = {lbl: s[0] for lbl, s in shapes.items()}
                vocab_rows[n] = VocabRows(min(rows.values()), rows[vocab_source], vocab_source)  # type: ignore[index]
            elif rows_only:
                vocab_problems.append(
                    f"vocabulary mismatch in {n!r}: "
                    + ", ".join(f"{lbl}: {s[0]} rows" for lbl, s in shapes.items())
                )
            else:
                shape_problems.append(
                    f"tensor {n!r}: shapes differ: "
                    + ", ".join(f"{lbl}: {tuple(s)}" for lbl, s in shapes.items())
                )
        # Task vectors may be stored in any float dtype (τ is upcast to float32); only models must agree.
        dtypes = {i.label: infos[i.label].dtype for i in inputs if not i.is_vector and i.label in infos}
        if len(set(dtypes.values())) > 1 and cast_code is None:
            dtype_problems.append(
                f"tensor {n!r}: dtypes differ: "
                + ", ".join(f"{lbl}: {d}" for lbl, d in dtypes.items())
                + " (set `dtype:` in the config to cast inputs)"
            )
    if len(set(vocab_sizes.values())) > 1 and vocab_policy == "error":
        vocab_problems.insert(
            0, "config vocab_size differs: " + ", ".join(f"{k}: {v}" for k, v in vocab_sizes.items())
        )
    if vocab_problems:
        vocab_problems.append(
            "vocabularies differ and the vocab policy is 'error'; to merge the shared rows and take the "
            "extra rows (and tokenizer) from one input, set vocab_policy: merge_shared and vocab_source: <model>"
        )
    problems += _cap(shape_problems, "shape") + _cap(dtype_problems, "dtype") + vocab_problems

    # ---- task vectors must belong to this base
    for i in inputs:
        if i.is_vector and i.base_fingerprint is not None and not ref.is_vector:
            actual = ref.checkpoint.content_fingerprint()
            if actual != i.base_fingerprint:
                problems.append(
                    f"{i.label}: task vector was computed against a base with fingerprint "
                    f"{i.base_fingerprint[:12]}…, but the base {ref.label} has {actual[:12]}…"
                )

    # ---- output tensors, sizes, disk
    tensors: list[OutTensor] = []
    for n in common:
        info = ref.checkpoint.tensors[n]
        shape = info.shape
        if n in vocab_rows:
            shape = (vocab_rows[n].out_rows, *shape[1:])
        dtype = info.dtype
        if dtype in FLOAT_CODES and out_code is not None:
            dtype = out_code
        tensors.append(OutTensor(n, tuple(shape), dtype))
    for t in tensors:
        if t.dtype not in FLOAT_CODES:
            log.info("tensor %s has dtype %s: copied from %s, not merged", t.name, t.dtype, ref.label)
    vocab_size = (
        vocab_sizes.get(vocab_source) if vocab_policy == "merge_shared" else vocab_sizes.get(ref.label)
    )
    estimate = max(0, sum(t.numel * dtype_size(t.dtype) for t in tensors) - finished_bytes) + extra_bytes
    free = _free_bytes(Path(out_dir)) if out_dir is not None else None
    if free is not None and estimate > free:
        problems.append(
            f"not enough free disk for the output in {out_dir}: needs about {estimate / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free"
        )
    if problems:
        raise PreflightError(problems)
    return PreflightResult(
        tensors=tensors,
        vocab_rows=vocab_rows,
        vocab_size=vocab_size,
        dropped=dropped,
        estimate_bytes=estimate,
        free_bytes=free,
    )
