"""What a tensor's name says about it: its transformer block, its module type, its module path.

One home for the naming rules of Llama / Qwen / Mistral checkpoints (GPT-2, NeoX and Falcon names best effort),
used by the merge parameters (layer gradients, layer filters), the similarity analysis, the contribution
variants and preflight. The analogue of mergekit's architecture definitions, by pattern instead of by table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MODULE_TYPES = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_o",
    "mlp_gate",
    "mlp_up",
    "mlp_down",
    "norm",
    "embed",
    "lm_head",
    "other",
)
# Coarse groups: contribution scopes, plots, per-group search coefficients.
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("attn_q", "attn_k", "attn_v", "attn_o"),
    "mlp": ("mlp_gate", "mlp_up", "mlp_down"),
    "norm": ("norm",),
    "embed": ("embed",),
    "lm_head": ("lm_head",),
}

_BLOCK = r"(?:layers|layer|h|blocks|block)"
_LAYER_RE = re.compile(rf"(?:^|\.){_BLOCK}\.(\d+)\.")
_LAYER_PREFIX_RE = re.compile(rf"^(.*?(?:^|\.){_BLOCK}\.\d+\.)")
# Checked in order; the first whose pattern matches the tensor name wins.
_MODULE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("norm", re.compile(r"(norm|(^|\.)ln_?\w*\.)", re.IGNORECASE)),
    ("lm_head", re.compile(r"(^|\.)(lm_head|embed_out|output)\.")),
    ("embed", re.compile(r"(embed_tokens|embeddings?|wte|wpe|tok_embeddings)\.")),
    ("attn_q", re.compile(r"\.(q_proj|query|wq)\.")),
    ("attn_k", re.compile(r"\.(k_proj|key|wk)\.")),
    ("attn_v", re.compile(r"\.(v_proj|value|wv)\.")),
    ("attn_o", re.compile(r"\.(o_proj|out_proj|wo|attn\.c_proj|attention\.dense|dense_out)\.")),
    ("mlp_gate", re.compile(r"\.(gate_proj|w1|fc_gate)\.")),
    ("mlp_up", re.compile(r"\.(up_proj|w3|fc1|fc_in|c_fc|dense_h_to_4h)\.")),
    ("mlp_down", re.compile(r"\.(down_proj|w2|fc2|fc_out|mlp\.c_proj|dense_4h_to_h)\.")),
)
# Tensors with one row per vocabulary entry (input embeddings and output heads).
VOCAB_NAME_PARTS = (
    "embed_tokens",
    "lm_head",
    "wte",
    "embed_in",
    "embed_out",
    "word_embeddings",
    "output.weight",
)
TIED_HEADS = ("lm_head.weight",)


def layer_index(name: str) -> int | None:
    """Transformer block index from a tensor name (``model.layers.7.mlp.up_proj.weight`` → 7), else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def layer_position(name: str, n_layers: int | None) -> float:
    """mergekit's gradient position t = layer / (n_layers − 1), capped at 1; 0 outside layers (1 layer: 1)."""
    idx = layer_index(name)
    if idx is None or not n_layers:
        return 0.0
    if n_layers == 1:
        return 1.0
    return min(1.0, idx / (n_layers - 1))


def module_type(name: str) -> str:
    """One of MODULE_TYPES for a tensor name."""
    for kind, pattern in _MODULE_RULES:
        if pattern.search(name):
            return kind
    return "other"


def module_group(name: str) -> str | None:
    """The MODULE_GROUPS key a tensor belongs to, or None ("other")."""
    kind = module_type(name)
    return next((group for group, kinds in MODULE_GROUPS.items() if kind in kinds), None)


def module_key(name: str) -> str:
    """The tensor's module path without its block prefix and its weight/bias leaf:
    ``model.layers.3.self_attn.q_proj.weight`` -> ``.self_attn.q_proj.``; ``lm_head.weight`` -> ``lm_head.``."""
    m = _LAYER_PREFIX_RE.match(name)
    rest = name[m.end() :] if m else name
    stem = rest.rsplit(".", 1)[0] if "." in rest else rest
    return f".{stem}." if m else f"{stem}."


def is_vocab_tensor(name: str) -> bool:
    return any(part in name for part in VOCAB_NAME_PARTS)


def count_layers(names: Iterable[str]) -> int:
    """Blocks in a checkpoint from its tensor names (max index + 1; 0 without blocks)."""
    found = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(found) + 1 if found else 0
