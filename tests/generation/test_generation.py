"""Generation with the transformers backend in a child process: batched output equals one-at-a-time greedy
decoding, chat templates, resume after a SIGKILL, and the bad inputs of the issue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mergealign.errors import ConfigError, MergeAlignError
from mergealign.generation import GenerationSettings, RuntimeSettings, generate
from mergealign.generation.runner import PROJECT_ROOT, resolve_python
from mergealign.generation.templates import resolve_chat_template
from tests.helpers import models as tiny
from tests.helpers.evaluation import PROMPTS, greedy_reference, read_jsonl, write_jsonl

# One torch thread: the tiny model gains nothing from two, and two OpenMP threads on a busy 2-core machine
# slow down by an order of magnitude.
FLOAT32 = RuntimeSettings(dtype="float32", batch_size=3, num_threads=1)


def test_batched_generation_matches_one_prompt_at_a_time(tmp_path, chat_model, prompts_file):
    out = tmp_path / "gens.jsonl"
    settings = GenerationSettings(max_tokens=20, record_token_ids=True, runtime=FLOAT32)
    summary = generate(chat_model, prompts_file, out, settings)
    rows = read_jsonl(out)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in PROMPTS]
    reference = greedy_reference(chat_model, conversations, 20)
    assert [r["id"] for r in rows] == [p["id"] for p in PROMPTS]
    for row, prompt, expected, conversation in zip(rows, PROMPTS, reference, conversations, strict=True):
        assert {k: row[k] for k in prompt} == prompt
        assert row["response_token_ids"] == expected  # left-padded batch == unpadded single prompt
        stopped = expected[-1] == tokenizer.eos_token_id
        assert row["finish_reason"] == ("stop" if stopped else "length")
        assert row["completion_tokens"] == len(expected)
        assert row["response"] == tokenizer.decode(
            expected[:-1] if stopped else expected, skip_special_tokens=True
        )
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert row["rendered_prompt"] == rendered
        assert row["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        assert (row["backend"], row["chat_template"], row["model"]) == (
            "transformers",
            "model",
            str(chat_model),
        )
    assert len({r["prompt_tokens"] for r in rows}) == 3  # the batch really needed padding
    assert (summary.n_prompts, summary.n_generated, summary.n_resumed, summary.skipped) == (3, 3, 0, False)
    assert summary.completion_tokens == sum(len(e) for e in reference) and summary.tokens_per_second > 0
    assert not list(tmp_path.glob("*.partial-*")) and not list(tmp_path.glob(".*work*"))

    before = out.read_bytes()
    again = generate(chat_model, prompts_file, out, settings)
    assert again.skipped and again.n_generated == 0 and out.read_bytes() == before


def test_model_without_chat_template_and_none_configured(tmp_path, base_model, prompts_file):
    with pytest.raises(MergeAlignError) as info:
        generate(base_model, prompts_file, tmp_path / "gens.jsonl", GenerationSettings(max_tokens=4))
    assert str(base_model) in str(info.value) and "has no chat template" in str(info.value)
    assert "chat_template" in str(info.value)
    assert list(tmp_path.iterdir()) == [prompts_file]  # failed before any child process or file


def test_configured_template_is_used_and_recorded(tmp_path, base_model, chat_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    settings = GenerationSettings(max_tokens=4, chat_template=str(chat_model), runtime=FLOAT32)
    generate(base_model, prompts, tmp_path / "gens.jsonl", settings)
    (row,) = read_jsonl(tmp_path / "gens.jsonl")
    assert row["chat_template"] == str(chat_model)
    assert row["rendered_prompt"] == f"<s><|user|>{PROMPTS[0]['prompt']}<|end|><|assistant|>"
    assert row["completion_tokens"] <= 4


def test_template_sources(tmp_path, base_model):
    jinja = tmp_path / "t.jinja"
    jinja.write_text(tiny.CHAT_TEMPLATE)
    from_file = resolve_chat_template(str(base_model), str(jinja))
    inline = resolve_chat_template(str(base_model), tiny.CHAT_TEMPLATE)
    assert from_file.text == inline.text == tiny.CHAT_TEMPLATE and from_file.sha256 == inline.sha256
    assert from_file.source == str(jinja) and inline.source.startswith("inline:")
    with pytest.raises(MergeAlignError, match="does not exist"):
        resolve_chat_template(str(base_model), str(tmp_path / "missing.jinja"))
    with pytest.raises(MergeAlignError, match="fails on a single user message"):
        resolve_chat_template(str(base_model), "{{ raise_exception('no') }}")


def _partial(out: Path) -> Path | None:
    found = list(out.parent.glob(f"{out.name}.partial-*.jsonl"))
    return found[0] if found else None


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
def test_resume_after_the_worker_is_killed(tmp_path, chat_model):
    prompts = [
        {
            "id": f"q{i:02d}",
            "prompt": f"{tiny.USER_PROMPTS[i % 6]} Case {i}.",
            "category": None,
            "prompt_set": "kill",
            "kind": "harmful",
        }
        for i in range(16)
    ]
    prompts_path = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    out = tmp_path / "gens.jsonl"
    settings = GenerationSettings(
        max_tokens=32,
        record_token_ids=True,
        runtime=RuntimeSettings(dtype="float32", batch_size=1, chunk_size=1, num_threads=1),
    )
    script = (
        "from mergealign.generation import GenerationSettings, generate\n"
        f"generate({str(chat_model)!r}, {str(prompts_path)!r}, {str(out)!r}, "
        f"GenerationSettings.model_validate_json({settings.model_dump_json()!r}))\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and parent.poll() is None:
            partial = _partial(out)
            if partial and partial.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        workers = _children(parent.pid)
        assert parent.poll() is None and workers, "generation ended before it could be killed"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        output, _ = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode != 0
    assert "killed by signal 9" in output and "re-run resumes" in output
    assert not out.exists()  # nothing that a later run could take for done

    partial = _partial(out)
    kept = read_jsonl(partial)
    assert 3 <= len(kept) < 16
    kept_ids = [r["id"] for r in kept]
    missing = [p["id"] for p in prompts if p["id"] not in kept_ids]
    with open(partial, "a") as handle:  # a duplicate row and a torn write, as a crash could leave them
        handle.write(partial.read_text().splitlines()[0] + "\n")
        handle.write('{"id": "' + missing[0] + '", "rendered_prompt": "<s><|us')

    summary = generate(chat_model, prompts_path, out, settings)
    assert (summary.n_resumed, summary.n_generated) == (len(kept), 16 - len(kept))
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [p["id"] for p in prompts]  # each prompt exactly once, in order
    by_id = {r["id"]: r for r in rows}
    for old in kept:
        assert by_id[old["id"]]["response_token_ids"] == old["response_token_ids"]
    checked = kept_ids[:2] + missing[:2]
    conversations = [
        [{"role": "user", "content": next(p["prompt"] for p in prompts if p["id"] == i)}] for i in checked
    ]
    for prompt_id, expected in zip(checked, greedy_reference(chat_model, conversations, 32), strict=True):
        assert by_id[prompt_id]["response_token_ids"] == expected
    assert _partial(out) is None


def test_interpreter_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the project root, not the cwd
    fake = PROJECT_ROOT / ".venv" / "bin" / "python"
    monkeypatch.setenv("MERGEALIGN_VLLM_PYTHON", ".venv/bin/python")
    assert resolve_python(RuntimeSettings(backend="vllm")) == str(fake)
    monkeypatch.setenv("MERGEALIGN_VLLM_PYTHON", "no/such/python")
    with pytest.raises(ConfigError, match="no/such/python does not exist"):
        resolve_python(RuntimeSettings(backend="vllm"))
    assert resolve_python(RuntimeSettings(backend="transformers")) == sys.executable
    assert resolve_python(RuntimeSettings(python=".venv/bin/python")) == str(fake)


def test_settings_fingerprint():
    base = GenerationSettings(max_tokens=64)
    assert base.cache_fingerprint() == GenerationSettings(max_tokens=64).cache_fingerprint()
    assert base.cache_fingerprint() != GenerationSettings(max_tokens=65).cache_fingerprint()
    assert base.cache_fingerprint() != GenerationSettings(max_tokens=64, seed=1).cache_fingerprint()
    same = GenerationSettings(max_tokens=64, runtime=RuntimeSettings(python="/x/python", chunk_size=3))
    assert base.cache_fingerprint() == same.cache_fingerprint()
    with pytest.raises(ValueError):
        GenerationSettings(max_tokens=0)
