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

VOCAB_SIZE = 320
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
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
    """Train a small byte-level BPE tokenizer (VOCAB_SIZE entries), save it to `path` and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def _config(arch: str, tokenizer, vocab_size: int | None):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    raise ValueError(f"arch must be 'llama' or 'qwen2', not {arch!r}")


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
    """Build one model directory at `path`.

    Without `from_model`: random init from `seed`. With it: that model's weights + N(0, noise²) from `seed`.
    `vocab_size` overrides the embedding rows (a mismatching vocabulary for bad-input tests).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
    config = _config(arch, tokenizer, vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if from_model is not None:
        source = load_state_dict(from_model)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(model.state_dict(keep_vars=True).items()):
                if name not in source:  # lm_head of a tied model: shares the embedding parameter
                    continue
                base = source[name].float()
                p.copy_((base + noise * torch.randn(base.shape, generator=gen)).to(dtype))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kwargs)
    return path


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
