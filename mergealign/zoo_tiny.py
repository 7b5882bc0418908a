"""A random tiny trio of real checkpoints (base, aligned, expert) for smoke runs and tests; no downloads.

    from mergealign.zoo_tiny import build_tiny_zoo
    trio = build_tiny_zoo("zoo")        # TinyTrio(base=zoo/base, aligned=zoo/aligned, expert=zoo/expert)

- Llama (untied lm_head) or Qwen2 (tied embeddings); size "tiny": hidden 64, 2 attention heads of head_dim 32
  (vLLM's CPU backend needs head_dim >= 32), 1 KV head, 2 layers, intermediate 128; size "small": hidden 512,
  16 heads, 4 layers (~17M parameters); vocab = the tokenizer's 320 entries.
- `build_model` also takes other sizes (a mapping of the config's size fields) and a `TokenizerSpec` (corpus,
  special tokens, chat template): the tests build every tiny checkpoint, chat models and judges included, here.
- aligned = base + N(0, noise²) (seed + 1), expert = base + N(0, noise²) (seed + 2), in float32, stored in
  `dtype`. Same arguments give byte-identical weight files.
- Each directory is a normal Hugging Face model: model.safetensors, config.json with "architectures",
  generation_config.json, a byte-level BPE tokenizer with a ChatML chat template.
- The trio is built in a temporary sibling directory and renamed into place with `zoo.json` written last, so
  a killed build is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

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
    "Sorry, I can't assist with anything illegal or harmful.",
    "Interest rates rose by a quarter of a percent this quarter.",
    "Merging models adds task vectors to the weights of a base model.",
    "Explain how to pick a lock. Write a poem about the sea.",
]
MARKER = "zoo.json"
# head_dim 32 everywhere. "small" (~17M parameters, 34 MB in bfloat16) makes a merge last long enough to be
# interrupted in tests; "tiny" (~60k parameters) is for everything else.
SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 32},
    "small": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 16,
              "num_key_value_heads": 4, "head_dim": 32},
}  # fmt: skip
SIZE_FIELDS = frozenset(SIZES["tiny"])
ROLES = ("base", "aligned", "expert")


@dataclass(frozen=True)
class TinyTrio:
    base: Path
    aligned: Path
    expert: Path


@dataclass(frozen=True)
class TokenizerSpec:
    """What `build_tokenizer` trains: a byte-level BPE of `vocab_size` entries on `corpus`, its special tokens
    (bos / eos / pad / unk name some of them; None leaves one unset) and its chat template (None: none)."""

    corpus: tuple[str, ...] = tuple(_CORPUS)
    vocab_size: int = VOCAB_SIZE
    special_tokens: tuple[str, ...] = tuple(SPECIAL_TOKENS)
    bos_token: str = "<|endoftext|>"
    eos_token: str = "<|im_end|>"
    pad_token: str = "<|endoftext|>"
    unk_token: str | None = "<|endoftext|>"
    chat_template: str | None = CHAT_TEMPLATE
    min_frequency: int = 0  # BpeTrainer's default: every pair may merge


def build_tokenizer(path: str | os.PathLike[str], spec: TokenizerSpec | None = None):
    """Train the tokenizer `spec` describes (default: ours, with a ChatML template), save it to `path`,
    return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = spec or TokenizerSpec()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.special_tokens),
        min_frequency=spec.min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(spec.corpus), trainer=trainer)
    named = {"bos_token": spec.bos_token, "eos_token": spec.eos_token, "pad_token": spec.pad_token,
             "unk_token": spec.unk_token}  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in named.items() if v is not None})
    if spec.chat_template is not None:
        fast.chat_template = spec.chat_template
    fast.save_pretrained(str(path))
    return fast


def _sizes(size: str | Mapping[str, int]) -> dict[str, int]:
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
        return dict(SIZES[size])
    if set(size) != SIZE_FIELDS:
        raise ValueError(f"a size mapping needs exactly {', '.join(sorted(SIZE_FIELDS))}; got {sorted(size)}")
    return dict(size)


def _config(arch: str, tokenizer, vocab_size: int | None, size: str | Mapping[str, int] = "tiny",
            max_positions: int = 512, init_std: float | None = None):  # fmt: skip
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size or len(tokenizer),
        **_sizes(size),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if init_std is not None:  # else transformers' default (0.02)
        common["initializer_range"] = init_std
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    raise ValueError(f"arch must be 'llama' or 'qwen2', not {arch!r}")


def build_model(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    dtype: str = "bfloat16",
    seed: int = 0,
    from_model: str | os.PathLike[str] | None = None,
    noise: float = 0.02,
    vocab_size: int | None = None,
    size: str | Mapping[str, int] = "tiny",
    max_shard_size: int | str | None = None,
    tokenizer: TokenizerSpec | None = None,
    max_positions: int = 512,
    max_new_tokens: int | None = 32,
    init_std: float | None = None,
) -> Path:
    """One tiny model directory: random from `seed`, or `from_model`'s weights + N(0, noise²) from `seed`.

    `size` is a name of SIZES or a mapping of the same fields; `vocab_size` overrides the embedding rows;
    `max_shard_size` shards the weights (save_pretrained's); `tokenizer` says which tokenizer to train;
    `max_new_tokens` goes into generation_config.json (None: left out); `init_std` is the random init's
    standard deviation (initializer_range; None: transformers' default).
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fast = build_tokenizer(path, tokenizer)
    config = _config(arch, fast, vocab_size, size, max_positions, init_std)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch_dtype)
    if from_model is not None:
        source: dict[str, torch.Tensor] = {}
        for f in sorted(Path(from_model).glob("*.safetensors")):
            source.update(load_file(str(f)))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(model.state_dict(keep_vars=True).items()):
                if name not in source:  # a tied lm_head shares the embedding parameter
                    continue
                base = source[name].float()
                p.copy_((base + noise * torch.randn(base.shape, generator=gen)).to(torch_dtype))
    if max_new_tokens is not None:
        model.generation_config.max_new_tokens = max_new_tokens
    model.save_pretrained(str(path), **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    return path


def is_built(directory: str | os.PathLike[str]) -> bool:
    d = Path(directory)
    return (d / MARKER).is_file() and all((d / r / "config.json").is_file() for r in ROLES)


def build_tiny_zoo(
    directory: str | os.PathLike[str],
    *,
    seed: int = 0,
    arch: str = "llama",
    dtype: str = "bfloat16",
    noise: float = 0.02,
    size: str = "tiny",
    overwrite: bool = False,
) -> TinyTrio:
    """Build base/, aligned/ and expert/ under `directory` unless a finished trio is already there."""
    d = Path(directory).expanduser().resolve()
    trio = TinyTrio(base=d / "base", aligned=d / "aligned", expert=d / "expert")
    wanted = {"seed": seed, "arch": arch, "dtype": dtype, "noise": noise, "size": size}
    if is_built(d) and not overwrite:
        found = json.loads((d / MARKER).read_text())
        if {k: found.get(k) for k in wanted} != wanted:
            log.warning(
                "tiny zoo %s was built with %s, not %s; keeping it (pass overwrite to rebuild)",
                d,
                found,
                wanted,
            )
        return trio
    if d.exists() and any(d.iterdir()) and not is_built(d) and not overwrite:
        stray = sorted(p.name for p in d.iterdir())
        if set(stray) - {*ROLES, MARKER}:
            from mergealign.errors import MergeAlignError

            raise MergeAlignError(
                f"{d}: exists and holds other files ({', '.join(stray[:5])}); choose an empty folder"
            )
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = d.parent / f".{d.name}.building-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        log.info("building a tiny %s trio in %s (seed %d)", arch, d, seed)
        build_model(tmp / "base", arch=arch, dtype=dtype, seed=seed, size=size)
        for role, offset in (("aligned", 1), ("expert", 2)):
            build_model(tmp / role, arch=arch, dtype=dtype, seed=seed + offset, from_model=tmp / "base", noise=noise,
                        size=size)  # fmt: skip
        (tmp / MARKER).write_text(json.dumps({**wanted, "roles": list(ROLES)}, indent=2))
        if d.exists():
            shutil.rmtree(d)
        os.replace(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return trio
