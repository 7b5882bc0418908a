"""CPU fine-tuning for the demo zoo: LoRA on the attention and MLP projections, merged back into full weights.

The embeddings (and the tied lm_head) stay frozen, so a task vector lives in the transformer blocks only,
and the saved checkpoint has exactly the base's tensor names, shapes and dtypes (the trio merges). Chat
records use the base's chat template with the loss on assistant tokens only; plain-text records (prose) are
trained on every token. Deterministic given the seed on a given machine and thread count: LoRA init from
torch.manual_seed(seed), batch order from random.Random(seed). Matmuls run under bf16 autocast where the
CPU supports bf16 (about 1.6x faster on AVX-512-BF16); LoRA weights and the merged model stay fp32.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mergealign.demo.steps import input_fingerprint, run_step
from mergealign.devices import torch_threads
from mergealign.errors import CheckpointError, MergeAlignError
from mergealign.files import read_jsonl

log = logging.getLogger(__name__)

IGNORE = -100
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_SKIP_COPY = {*_WEIGHT_FILES, "config.json", "zoo_step.json"}


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyperparameters (all of them go into the step key)."""

    epochs: float = 3.0
    lr: float = 1e-3
    lora_rank: int = 16
    lora_alpha: int = 32
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    # LoRA only in layers [first, last); None = all. Layers below `first` need no backward pass.
    layers: tuple[int, int] | None = None
    batch_size: int = 8
    max_len: int = 192
    warmup_fraction: float = 0.05
    seed: int = 0
    bf16_autocast: bool | None = None  # None: on when the CPU supports bf16
    kinds: tuple[str, ...] | None = None  # train only on records of these kinds; None = all

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        unknown = sorted(set(overrides) - set(asdict(self)))
        if unknown:
            raise ValueError(f"unknown training parameter(s): {', '.join(unknown)}")
        return replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# --------------------------------------------------------------------------- tokenization
def encode_record(tokenizer, record: dict[str, Any], max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record; labels are IGNORE outside assistant turns (chat) or nowhere (text).

    A chat is rendered turn by turn with the tokenizer's chat template, so the rendering of every prefix is
    exactly what the model sees at inference; a record with end_of_turn=False leaves out the last turn's
    end-of-turn token (its answer was cut, the model must not learn to stop there).
    """
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"][:max_len]
        return ids, list(ids)
    messages = record["messages"]
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise MergeAlignError(
                "chat template does not render conversations prefix by prefix; cannot mask turns"
            )
        answer = full[len(prompt) :]
        if i == len(messages) - 1 and record.get("end_of_turn", True) is False:
            content = message["content"]
            answer = answer[: answer.index(content) + len(content)] if content in answer else answer
        prompt_ids = tokenizer(prompt[len(rendered) :], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids += prompt_ids + answer_ids
        labels += [IGNORE] * len(prompt_ids) + answer_ids
        rendered = full
    return ids[:max_len], labels[:max_len]


def _batches(examples: list[tuple[list[int], list[int]]], batch_size: int, steps: int, rng: random.Random):
    """`steps` batches over repeated shuffled passes; inside a window of 8 batches, similar lengths go together."""
    out: list[list[int]] = []
    while len(out) < steps:
        order = list(range(len(examples)))
        rng.shuffle(order)
        window = batch_size * 8
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: len(examples[i][0]))
            group = [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
            rng.shuffle(group)
            out += group
    return out[:steps]


def _collate(examples, idx: list[int], pad_id: int, multiple: int = 32) -> dict[str, torch.Tensor]:
    # Widths rounded up to a multiple of 32: oneDNN builds kernels per shape, and a new shape per batch
    # cost more than the padding (bf16 autocast: ~10 s per new shape on a busy 2-core machine).
    width = -(-max(len(examples[i][0]) for i in idx) // multiple) * multiple
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        x, y = examples[i]
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# --------------------------------------------------------------------------- checkpoint checks
def tensor_signature(model_dir: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} from the safetensors headers of a model directory."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files")
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                sl = handle.get_slice(name)
                out[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    return out


def check_same_tensors(base_dir: str | os.PathLike[str], model_dir: str | os.PathLike[str]) -> None:
    """Raise CheckpointError naming every tensor whose name, shape or dtype differs from the base's."""
    base, other = tensor_signature(base_dir), tensor_signature(model_dir)
    problems = [f"{n}: missing in {model_dir}" for n in sorted(set(base) - set(other))]
    problems += [f"{n}: not in the base {base_dir}" for n in sorted(set(other) - set(base))]
    problems += [
        f"{n}: {other[n]} vs base {base[n]}" for n in sorted(set(base) & set(other)) if base[n] != other[n]
    ]
    if problems:
        raise CheckpointError(
            f"{model_dir} does not match its base tensor for tensor:\n  " + "\n  ".join(problems[:20])
        )


# --------------------------------------------------------------------------- training
def finetune(
    base_dir: str | os.PathLike[str],
    records: list[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    progress: bool = True,
    desc: str = "fine-tuning",
    threads: int | None = None,
) -> dict[str, Any]:
    """LoRA-fine-tune the model in `base_dir` on `records`, merge the adapters and save a full checkpoint
    (same tensors as the base, plus tokenizer and chat template) into `out_dir` (which must not exist).
    Returns training metrics. `threads`: torch threads for this call (None: leave as is); on a machine whose
    cores are shared with other work, 1 thread avoids OpenMP threads waiting for each other.
    """
    with torch_threads(threads):
        return _finetune(base_dir, records, out_dir, config, progress, desc)


def _finetune(base_dir, records, out_dir, config: TrainConfig, progress: bool, desc: str) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if config.kinds is not None:
        records = [r for r in records if r.get("kind") in config.kinds]
    if not records:
        raise MergeAlignError("no training records (check the data directory and `kinds`)")
    torch.manual_seed(config.seed)
    rng = random.Random(f"train-{config.seed}")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    examples = [encode_record(tokenizer, r, config.max_len) for r in records]
    examples = [e for e in examples if any(y != IGNORE for y in e[1][1:])]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    base_signature = tensor_signature(base_dir)
    n_layers = model.config.num_hidden_layers
    first, last = config.layers if config.layers is not None else (0, n_layers)
    if not 0 <= first < last <= n_layers:
        raise ValueError(f"layers must satisfy 0 <= first < last <= {n_layers}, not {config.layers}")
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(config.target_modules),
        layers_to_transform=list(range(first, last)),
        bias="none",
    )
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    inner = model.get_base_model()
    steps = max(1, math.ceil(config.epochs * len(examples) / config.batch_size))
    warmup = max(1, int(steps * config.warmup_fraction))
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    autocast = _cpu_has_bf16() if config.bf16_autocast is None else config.bf16_autocast
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses: list[float] = []
    tokens = 0
    started = time.time()
    model.train()
    bar = tqdm(
        _batches(examples, config.batch_size, steps, rng), total=steps, desc=desc, disable=not progress
    )
    for idx in bar:
        batch = _collate(examples, idx, pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = inner.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            # Logits only where there is a label: the 49k-wide lm_head is a large share of the cost.
            targets = batch["labels"][:, 1:]
            keep = targets != IGNORE
            logits = inner.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    seconds = time.time() - started
    merged = model.merge_and_unload()
    dtypes = {s[1] for s in base_signature.values()}
    merged = merged.to({"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtypes.pop()])
    merged.save_pretrained(str(out_dir))
    for f in base_dir.iterdir():  # tokenizer, chat template, generation config: exactly the base's
        if f.is_file() and f.name not in _SKIP_COPY:
            shutil.copy2(f, out_dir / f.name)
    check_same_tensors(base_dir, out_dir)
    return {
        "steps": steps,
        "examples": len(examples),
        "tokens": tokens,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "loss_first10": round(sum(losses[:10]) / len(losses[:10]), 4),
        "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "bf16_autocast": autocast,
        "lora_layers": [first, last],
        "trainable_parameters": sum(p.numel() for p in trainable),
    }


def _train_step(
    step: str,
    base_dir: str | os.PathLike[str],
    data_file: Path,
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    progress: bool,
    threads: int | None,
) -> dict[str, Any]:
    if not data_file.is_file():
        raise MergeAlignError(f"{data_file}: training data not found")
    if not (Path(base_dir) / "config.json").is_file():
        raise CheckpointError(f"{base_dir}: not a model directory (no config.json)")
    params = {
        "base": input_fingerprint(base_dir),
        "data": input_fingerprint(data_file.parent),
        "config": json.loads(json.dumps(asdict(config), default=list)),
    }
    return run_step(
        step,
        out_dir,
        params,
        lambda tmp: finetune(
            base_dir,
            read_jsonl(data_file),
            tmp,
            config,
            progress,
            desc=step.replace("_", " "),
            threads=threads,
        ),
    )


# Tuned on SmolLM2-135M, seed 0 (held-out prompts and paraphrased questions; see the README's demo table).
# The expert learns its domain as the paper's experts do, by continued pre-training on domain prose. How it
# learns decides whether the alignment vector survives a merge (measured, seed 0, aligned model 100 % refusals):
#   expert trained on                                   held-out score   refusals, MergeAlign sum / interp 0.5
#   prose, 16 epochs (these defaults)                            75 %              81 % / 72 %
#   prose + the Q&A pairs as FAQ text, 8 epochs                  99 %              25 % / 38 %
#   chat Q&A + "tell me about" chats + prose, 4 epochs           91 %              25 % / 25 %
# Taught question-answer pairs, it learns to answer whatever it is asked, and its vector overrides refusals.
ALIGNED_DEFAULTS = TrainConfig(epochs=2.0, lr=2e-3, lora_rank=16, lora_alpha=32, layers=None, seed=0)
EXPERT_DEFAULTS = TrainConfig(
    epochs=16.0, lr=2e-3, lora_rank=16, lora_alpha=32, layers=None, seed=0, kinds=("prose",)
)


def train_aligned(
    base_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    progress: bool = True,
    threads: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Fine-tune the base to refuse harmful prompts and keep its own benign answers; `data` is the
    aligned-data directory (aligned_train.jsonl). Overrides: any TrainConfig field; `threads` as in finetune."""
    config = ALIGNED_DEFAULTS.with_overrides(**overrides)
    data = Path(data)
    data_file = data / "aligned_train.jsonl" if data.is_dir() else data
    return _train_step("train_aligned", base_dir, data_file, out_dir, config, progress, threads)


def train_expert(
    base_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    progress: bool = True,
    threads: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Fine-tune the base on the fictional knowledge base; `data` is the knowledge-data directory
    (expert_train.jsonl). Overrides: any TrainConfig field; `threads` as in finetune."""
    config = EXPERT_DEFAULTS.with_overrides(**overrides)
    data = Path(data)
    data_file = data / "expert_train.jsonl" if data.is_dir() else data
    return _train_step("train_expert", base_dir, data_file, out_dir, config, progress, threads)
