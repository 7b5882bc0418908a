"""Child-process worker: runs one model over a JSONL of inputs and appends one result row per input.

Self-contained on purpose: it imports only the standard library, torch, transformers and (for the vllm
backend) vllm, never mergealign, so the parent can run it by file path with another virtualenv's
interpreter (vLLM's pins fight the orchestrator's). Each run is its own process because vLLM cannot free
an engine in-process.

Usage: python worker.py REQUEST.json

Request (JSON): backend, model, runtime{dtype, device, batch_size, chunk_size, tensor_parallel_size,
gpu_memory_utilization, max_model_len, enforce_eager, trust_remote_code}, sampling{max_tokens,
temperature, top_p, seed, ignore_eos, record_token_ids, score_tokens}, chat_template, chat_template_kwargs,
content_format ("string" | "openai"), inputs (JSONL of {"id", "messages"} or {"id", "text"}),
output (JSONL, appended chunk by chunk with fsync), stats (JSON written at the end).

Output row: id, rendered_prompt, response, finish_reason ("stop" | "length"), prompt_tokens,
completion_tokens (stop token included), response_token_ids (if record_token_ids), and with score_tokens:
score_logprobs {token text: log-probability of its first token} at score_position, the first generated
position whose token is not whitespace.
"""

import json
import os
import sys
import time

SCORE_SEARCH_POSITIONS = 8


def _log(message):
    print(f"[worker] {message}", file=sys.stderr, flush=True)


def _read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
    return rows


class _Appender:
    """Appends rows and makes each chunk durable before the next starts, so a kill loses at most a chunk."""

    def __init__(self, path):
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, rows):
        for row in rows:
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self):
        self.handle.close()


def _write_json_atomic(path, value):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _stop_token_ids(model, tokenizer, trust_remote_code):
    """The tokenizer's EOS plus generation_config.json's eos_token_id(s): the same set for both backends."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        eos = config.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(i) for i in eos)
    except Exception:  # no generation_config.json: the tokenizer's EOS alone
        pass
    return sorted(ids)


def _score_token_ids(tokenizer, texts):
    ids = {}
    for text in texts or []:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if not encoded:
            raise ValueError(f"score token {text!r} encodes to no tokens")
        ids[text] = encoded[0]
    return ids


def _score_position(tokenizer, token_ids):
    for position, token_id in enumerate(token_ids[:SCORE_SEARCH_POSITIONS]):
        if tokenizer.decode([token_id], skip_special_tokens=False).strip():
            return position
    return 0


def _chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _message_content(messages, content_format):
    if content_format != "openai":
        return messages
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
        for m in messages
    ]


# ---------------------------------------------------------------- transformers


def run_transformers(request, rows, appender):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    runtime, sampling = request["runtime"], request["sampling"]
    model_path, trust = request["model"], runtime["trust_remote_code"]
    started = time.perf_counter()
    torch.manual_seed(sampling["seed"])
    if runtime.get("num_threads"):
        torch.set_num_threads(runtime["num_threads"])
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
    device = runtime["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = runtime["dtype"] if runtime["dtype"] != "auto" else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust)
    model.to(device).eval()
    stop_ids = _stop_token_ids(model_path, tokenizer, trust)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = stop_ids[0] if stop_ids else 0
    score_ids = _score_token_ids(tokenizer, sampling.get("score_tokens"))
    load_seconds = time.perf_counter() - started

    encoded = []
    for row in rows:
        if "messages" in row:
            rendered = tokenizer.apply_chat_template(
                _message_content(row["messages"], request.get("content_format", "string")),
                tokenize=False,
                add_generation_prompt=True,
                chat_template=request.get("chat_template"),
                **(request.get("chat_template_kwargs") or {}),
            )
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            rendered = row["text"]
            ids = tokenizer(rendered, add_special_tokens=True)["input_ids"]
        encoded.append((row, rendered, list(ids)))
    # Longest first: similar lengths share a batch, so less padding.
    encoded.sort(key=lambda item: -len(item[2]))

    do_sample = sampling["temperature"] > 0
    config_kwargs = dict(
        max_new_tokens=sampling["max_tokens"],
        do_sample=do_sample,
        pad_token_id=pad_id,
        eos_token_id=stop_ids or None,
        return_dict_in_generate=True,
        output_logits=bool(score_ids),
    )
    if do_sample:
        # top_k=0: no top-k cut, as in vLLM's defaults.
        config_kwargs.update(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=0)
    if sampling.get("ignore_eos"):
        config_kwargs["min_new_tokens"] = sampling["max_tokens"]
    generation_config = GenerationConfig(**config_kwargs)
    # generate() fills unset values from model.generation_config (the checkpoint's sampling defaults, e.g. a
    # repetition penalty); a blank one makes our settings the only ones, like vLLM's generation_config="vllm".
    model.generation_config = GenerationConfig()

    if encoded:  # one untimed token: lazy kernel set-up would otherwise count against tokens/s
        with torch.no_grad():
            model.generate(
                input_ids=torch.tensor([encoded[-1][2]], device=device),
                generation_config=GenerationConfig(max_new_tokens=1, pad_token_id=pad_id),
            )
    total, done, completion_tokens, prompt_tokens = len(encoded), 0, 0, 0
    gen_started = time.perf_counter()
    pending = []
    for batch in _chunks(encoded, runtime["batch_size"]):
        width = max(len(ids) for _, _, ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for b, (_, _, ids) in enumerate(batch):
            input_ids[b, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[b, width - len(ids) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=generation_config,
            )
        new_tokens = out.sequences[:, width:].tolist()
        for b, (row, rendered, ids) in enumerate(batch):
            tokens = new_tokens[b]
            finish = "length"
            for position, token_id in enumerate(tokens):
                if token_id in stop_ids and not sampling.get("ignore_eos"):
                    tokens, finish = tokens[: position + 1], "stop"
                    break
            text_tokens = tokens[:-1] if finish == "stop" else tokens
            result = {
                "id": row["id"],
                "rendered_prompt": rendered,
                "response": tokenizer.decode(text_tokens, skip_special_tokens=True),
                "finish_reason": finish,
                "prompt_tokens": len(ids),
                "completion_tokens": len(tokens),
            }
            if sampling.get("record_token_ids"):
                result["response_token_ids"] = tokens
            if score_ids:
                position = _score_position(tokenizer, tokens)
                logprobs = torch.log_softmax(out.logits[position][b].float(), dim=-1)
                result["score_position"] = position
                result["score_logprobs"] = {t: float(logprobs[i]) for t, i in score_ids.items()}
            completion_tokens += len(tokens)
            prompt_tokens += len(ids)
            pending.append(result)
        if len(pending) >= runtime["chunk_size"] or done + len(batch) == total:
            appender.write(pending)
            pending = []
        done += len(batch)
        elapsed = time.perf_counter() - gen_started
        _log(f"{done}/{total} rows, {completion_tokens / max(elapsed, 1e-9):.1f} tokens/s")
    import transformers

    return {
        "backend_version": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "device": device,
        "load_seconds": load_seconds,
        "generate_seconds": time.perf_counter() - gen_started,
        "rows": total,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }


# ---------------------------------------------------------------- vllm


def run_vllm(request, rows, appender):
    runtime = request["runtime"]
    if runtime.get("vllm_single_process") and runtime["tensor_parallel_size"] == 1:
        # Engine core and model worker in this process: two fewer vLLM start-ups (about half the start time
        # on CPU), slower decoding. Must be set before vllm is imported.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm
    from vllm import LLM, SamplingParams

    sampling = request["sampling"]
    started = time.perf_counter()
    engine_kwargs = dict(
        model=request["model"],
        dtype=runtime["dtype"],
        seed=sampling["seed"],
        tensor_parallel_size=runtime["tensor_parallel_size"],
        gpu_memory_utilization=runtime["gpu_memory_utilization"],
        enforce_eager=runtime["enforce_eager"],
        trust_remote_code=runtime["trust_remote_code"],
        # "vllm": our SamplingParams decide, not the checkpoint's generation_config.json defaults.
        generation_config="vllm",
    )
    if runtime.get("max_model_len"):
        engine_kwargs["max_model_len"] = runtime["max_model_len"]
    if runtime.get("vllm_single_process") and runtime["tensor_parallel_size"] == 1:
        engine_kwargs["distributed_executor_backend"] = "uni"
    llm = LLM(**engine_kwargs)
    tokenizer = llm.get_tokenizer()
    stop_ids = _stop_token_ids(request["model"], tokenizer, runtime["trust_remote_code"])
    score_ids = _score_token_ids(tokenizer, sampling.get("score_tokens"))
    load_seconds = time.perf_counter() - started

    params = SamplingParams(
        max_tokens=sampling["max_tokens"],
        temperature=sampling["temperature"],
        top_p=sampling["top_p"] if sampling["temperature"] > 0 else 1.0,
        seed=sampling["seed"] if sampling["temperature"] > 0 else None,
        ignore_eos=bool(sampling.get("ignore_eos")),
        stop_token_ids=stop_ids,
        logprob_token_ids=list(score_ids.values()) or None,
    )
    total, done, completion_tokens, prompt_tokens = len(rows), 0, 0, 0
    gen_started = time.perf_counter()
    for chunk in _chunks(rows, runtime["chunk_size"]):
        chat_rows = [r for r in chunk if "messages" in r]
        text_rows = [r for r in chunk if "messages" not in r]
        outputs = []
        if chat_rows:
            content_format = request.get("content_format", "string")
            outputs += zip(
                chat_rows,
                llm.chat(
                    [_message_content(r["messages"], content_format) for r in chat_rows],
                    params,
                    use_tqdm=False,
                    chat_template=request.get("chat_template"),
                    chat_template_content_format=content_format,
                    chat_template_kwargs=request.get("chat_template_kwargs") or None,
                    add_generation_prompt=True,
                ),
                strict=True,
            )
        if text_rows:
            outputs += zip(
                text_rows, llm.generate([r["text"] for r in text_rows], params, use_tqdm=False), strict=True
            )
        results = []
        for row, output in outputs:
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            prompt_ids = list(output.prompt_token_ids or [])
            rendered = output.prompt if output.prompt is not None else tokenizer.decode(prompt_ids)
            result = {
                "id": row["id"],
                "rendered_prompt": rendered,
                "response": completion.text,
                "finish_reason": "stop"
                if completion.finish_reason == "stop"
                else str(completion.finish_reason),
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": len(tokens),
            }
            if sampling.get("record_token_ids"):
                result["response_token_ids"] = tokens
            if score_ids:
                position = _score_position(tokenizer, tokens)
                at = completion.logprobs[position] if completion.logprobs else {}
                result["score_position"] = position
                result["score_logprobs"] = {
                    t: (float(at[i].logprob) if i in at else None) for t, i in score_ids.items()
                }
            completion_tokens += len(tokens)
            prompt_tokens += len(prompt_ids)
            results.append(result)
        appender.write(results)
        done += len(chunk)
        elapsed = time.perf_counter() - gen_started
        _log(f"{done}/{total} rows, {completion_tokens / max(elapsed, 1e-9):.1f} tokens/s")
    return {
        "backend_version": f"vllm {vllm.__version__}",
        "device": "vllm",
        "load_seconds": load_seconds,
        "generate_seconds": time.perf_counter() - gen_started,
        "rows": total,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }


def main(argv):
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as handle:
        request = json.load(handle)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = _read_jsonl(request["inputs"])
    _log(f"{request['backend']}: {len(rows)} rows on {request['model']}")
    appender = _Appender(request["output"])
    try:
        runner = run_vllm if request["backend"] == "vllm" else run_transformers
        stats = runner(request, rows, appender) if rows else {"rows": 0, "completion_tokens": 0}
    finally:
        appender.close()
    seconds = stats.get("generate_seconds") or 0.0
    stats["tokens_per_second"] = stats["completion_tokens"] / seconds if seconds > 0 else None
    _write_json_atomic(request["stats"], stats)
    if stats.get("tokens_per_second") is not None:
        _log(
            f"done: {stats['completion_tokens']} tokens in {seconds:.2f} s, {stats['tokens_per_second']:.1f} tokens/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
