"""Tiny real checkpoints for tests, built with transformers in a temp dir (no downloads).

    from tiny_models import make_trio, load_state_dict
    trio = make_trio(tmp_path, arch="llama")        # Trio(base, aligned, expert): three model directories
    sd = load_state_dict(trio.expert)                # {name: tensor} of every weight, for reference formulas
    bf16_ulp_diff(merged, reference)                 # max distance in bf16 ulps (0 = identical)

- arch "llama": LlamaForCausalLM, untied lm_head. arch "qwen2": Qwen2ForCausalLM, tie_word_embeddings=True
  (no lm_head.weight on disk).
- hidden 64, 2 heads of head_dim 32 (vLLM needs head_dim >= 32), 1 KV head, 2 layers, intermediate 128,
  vocab = the tokenizer's 320 entries.
- aligned = base + noise (seed+1), expert = base + noise (seed+2); noise ~ N(0, noise²) added in float32 and
  rounded to `dtype`. Same arguments -> byte-identical files.
- Each directory holds model.safetensors (or shards + index with `max_shard_size`), config.json with
  "architectures", generation_config.json, and a byte-level BPE tokenizer (PreTrainedTokenizerFast) with a
  ChatML chat template, so AutoTokenizer / apply_chat_template / generate and vLLM work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergealign import zoo_tiny
from mergealign.zoo_tiny import CHAT_TEMPLATE

__all__ = [
    "Trio",
    "make_trio",
    "make_model",
    "make_tokenizer",
    "load_state_dict",
    "bf16_ulp_diff",
    "bf16_ulps",
    "CHAT_TEMPLATE",
]

# The tests' tokenizer corpus (the smoke zoo's has two more sentences; tests keep theirs).
_CORPUS = [
    "The patient presented with a mild fever and a persistent cough.",
    "Take two tablets with water after each meal, unless told otherwise.",
    "How do I bake a loaf of bread at home?",
    "I cannot help with that request, but here is some safe information instead.",
    "Interest rates rose by a quarter of a percent this quarter.",
    "Merging models adds task vectors to the weights of a base model.",
]


@dataclass(frozen=True)
class Trio:
    """Three model directories: a base and two fine-tunes of it."""

    base: Path
    aligned: Path
    expert: Path


def make_tokenizer(path: str | Path):
    """Train the tests' byte-level BPE tokenizer (320 entries), save it to `path` and return it."""
    return zoo_tiny.build_tokenizer(path, _CORPUS)


def make_model(
    path: str | Path,
    arch: str = "llama",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    *,
    from_model: str | Path | None = None,
    noise: float = 0.01,
    max_shard_size: int | str | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Build one model directory at `path` (mergealign.zoo_tiny's builder with the tests' settings).

    Without `from_model`: random init from `seed`. With it: that model's weights + N(0, noise²) from `seed`.
    `vocab_size` overrides the embedding rows (a mismatching vocabulary for bad-input tests).
    """
    return zoo_tiny.build_model(
        path, arch=arch, dtype=str(dtype).removeprefix("torch."), seed=seed, from_model=from_model, noise=noise,
        vocab_size=vocab_size, max_shard_size=max_shard_size, corpus=_CORPUS, max_positions=256,
        max_new_tokens=None,
    )  # fmt: skip


def make_trio(
    tmp_path: str | Path,
    arch: str = "llama",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    *,
    noise: float = 0.01,
    max_shard_size: int | str | None = None,
) -> Trio:
    """base, aligned (= base + noise, seed+1), expert (= base + noise, seed+2) under tmp_path/<arch>-*."""
    root = Path(tmp_path)
    base = make_model(root / f"{arch}-base", arch, dtype, seed, max_shard_size=max_shard_size)
    kw = dict(from_model=base, noise=noise, max_shard_size=max_shard_size)
    aligned = make_model(root / f"{arch}-aligned", arch, dtype, seed + 1, **kw)
    expert = make_model(root / f"{arch}-expert", arch, dtype, seed + 2, **kw)
    return Trio(base=base, aligned=aligned, expert=expert)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (all *.safetensors files), as stored on disk."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def bf16_ulps(a: torch.Tensor, b: torch.Tensor, floor: float = 2.0**-20) -> torch.Tensor:
    """Element-wise |a − b| in bfloat16 units in the last place, both rounded to bf16 first.

    The ulp is taken at max(|a|, |b|, floor): below `floor` (≈1e-6) a float32 computation cannot be more
    exact than its inputs' rounding, so results that cancel to near zero are compared absolutely.
    0 = identical bf16 values; 1 = neighbouring bf16 numbers (at that magnitude).
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    x = a.to(torch.bfloat16).double()
    y = b.to(torch.bfloat16).double()
    mag = torch.maximum(torch.maximum(x.abs(), y.abs()), torch.tensor(floor, dtype=torch.float64))
    return (x - y).abs() / torch.exp2(torch.floor(torch.log2(mag)) - 7)


def bf16_ulp_diff(a: torch.Tensor, b: torch.Tensor, floor: float = 2.0**-20) -> float:
    """Largest element of bf16_ulps(a, b) (0.0 for empty tensors)."""
    return float(bf16_ulps(a, b, floor).max()) if a.numel() else 0.0
