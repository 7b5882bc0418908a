"""Linear CKA of hidden states per layer between models on a prompt set (transformers, CPU by default).

For features X (n × p) and Y (n × q) of the same n inputs, centred over the inputs,

    CKA(X, Y) = ‖Yᵀ X‖_F² / (‖Xᵀ X‖_F · ‖Yᵀ Y‖_F)         (Kornblith et al., 2019, linear kernel)

computed in float64, in the feature form when n > p, q and in the equivalent Gram form ⟨K, L⟩ / (‖K‖ ‖L‖) with
K = X Xᵀ, L = Y Yᵀ otherwise (cheaper). It is invariant to orthogonal transforms and isotropic scaling.

Models run one at a time (one in memory); every model sees the same token ids (the first model's tokenizer:
the models of a MergeAlign study share one). Features per layer (``hidden_states`` 0 = embeddings … L):
``pool="tokens"`` every non-padding token of every prompt, ``"mean"`` the mean over each prompt's tokens,
``"last"`` each prompt's last token.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergealign.errors import MergeAlignError
from mergealign.files import atomic_write_text

log = logging.getLogger(__name__)

POOLS = ("tokens", "mean", "last")


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two feature matrices with the same rows (inputs)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise MergeAlignError(
            f"linear_cka: need (n × p) and (n × q) matrices, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    n = x.shape[0]
    if n > max(x.shape[1], y.shape[1]):
        cross = (y.T @ x).pow(2).sum()
        den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    else:
        k, l_ = x @ x.T, y @ y.T
        cross = (k * l_).sum()
        den = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_)
    return float(cross / den) if float(den) > 0 else float("nan")


def read_prompts(path: str | os.PathLike[str], field: str = "prompt") -> list[str]:
    """Prompts from a text file (one a line) or JSONL (``field``, else ``text``)."""
    p = Path(path)
    if not p.is_file():
        raise MergeAlignError(f"{p}: prompt file not found")
    out: list[str] = []
    if p.suffix == ".jsonl":
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            text = row.get(field, row.get("text"))
            if not isinstance(text, str):
                raise MergeAlignError(
                    f"{p}, line {i}: no {field!r} (or 'text') string field; fields: {sorted(row)}"
                )
            out.append(text)
    else:
        out = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise MergeAlignError(f"{p}: no prompts")
    return out


def _tokenize(model_dir: str | os.PathLike[str], texts: Sequence[str], max_tokens: int) -> list[Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = []
    for t in texts:
        enc = tok(t, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"][0]
        if enc.numel() == 0:
            raise MergeAlignError(f"prompt {t!r} has no tokens")
        ids.append(enc)
    return ids


@torch.inference_mode()
def hidden_features(
    model_dir: str | os.PathLike[str], token_ids: Sequence[Tensor], *, pool: str = "mean", device: str = "cpu"
) -> list[Tensor]:
    """Per hidden-state layer, the features of all prompts (float32, rows = tokens or prompts)."""
    from transformers import AutoModelForCausalLM

    if pool not in POOLS:
        raise MergeAlignError(f"pool: must be one of {', '.join(POOLS)}, got {pool!r}")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    per_layer: list[list[Tensor]] | None = None
    for ids in token_ids:  # one prompt at a time: no padding to mask
        out = model(input_ids=ids.unsqueeze(0).to(device), output_hidden_states=True)
        states = [h[0].float().cpu() for h in out.hidden_states]
        if per_layer is None:
            per_layer = [[] for _ in states]
        for i, h in enumerate(states):
            per_layer[i].append(
                h if pool == "tokens" else (h.mean(0, keepdim=True) if pool == "mean" else h[-1:])
            )
    del model
    assert per_layer is not None
    return [torch.cat(chunks) for chunks in per_layer]


@dataclass
class CKAResult:
    models: list[str]
    n_layers: int  # hidden-state layers compared (embeddings + blocks)
    pairs: list[dict[str, Any]]  # {"a", "b", "cka": [per layer]}
    n_prompts: int
    n_rows: int  # feature rows per layer (tokens or prompts)
    pool: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "n_layers": self.n_layers,
            "pairs": self.pairs,
            "n_prompts": self.n_prompts,
            "n_rows": self.n_rows,
            "pool": self.pool,
        }

    def matrix(self, layer: int) -> dict[tuple[str, str], float]:
        return {(p["a"], p["b"]): p["cka"][layer] for p in self.pairs}

    def write(self, path: str | os.PathLike[str]) -> Path:
        """The result as JSON, written atomically."""
        return atomic_write_text(path, json.dumps(self.as_dict(), indent=1))


def compute_cka(
    models: Mapping[str, str | os.PathLike[str]],
    texts: Sequence[str],
    *,
    max_tokens: int = 128,
    pool: str = "mean",
    pairs: Sequence[tuple[str, str]] | None = None,
    device: str = "cpu",
) -> CKAResult:
    """CKA per layer for every pair of ``models`` (label -> directory), or the given ``pairs``."""
    labels = list(models)
    if len(labels) < 2:
        raise MergeAlignError("cka: give at least two models")
    if not texts:
        raise MergeAlignError("cka: no prompts")
    pairs = list(pairs) if pairs is not None else list(combinations(labels, 2))
    for a, b in pairs:
        for lab in (a, b):
            if lab not in models:
                raise MergeAlignError(f"cka: pair names unknown model {lab!r} (models: {', '.join(labels)})")
    ids = _tokenize(models[labels[0]], texts, max_tokens)
    feats: dict[str, list[Tensor]] = {}
    for lab in labels:
        log.info("cka: hidden states of %s", lab)
        feats[lab] = hidden_features(models[lab], ids, pool=pool, device=device)
    n_layers = {len(f) for f in feats.values()}
    if len(n_layers) != 1:
        raise MergeAlignError(
            f"cka: models have different numbers of layers: { {k: len(v) for k, v in feats.items()} }"
        )
    out = [
        {"a": a, "b": b, "cka": [linear_cka(x, y) for x, y in zip(feats[a], feats[b], strict=True)]}
        for a, b in pairs
    ]
    rows = feats[labels[0]][0].shape[0]
    return CKAResult(labels, n_layers.pop(), out, len(texts), rows, pool)
