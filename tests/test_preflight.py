"""Preflight from headers and configs only: what it accepts, what it reports, and that it reads no tensor data."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergealign.checkpoint import Checkpoint
from mergealign.errors import PreflightError
from mergealign.preflight import Input, preflight
from mergealign.shards import plan_shards
from tests.helpers.models import make_trio

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("qwen"), "qwen2")


def inputs(*dirs, labels=("base", "domain", "alignment")):
    return [Input(lbl, Checkpoint(d)) for lbl, d in zip(labels, dirs, strict=False)]


def test_accepts_a_matching_trio_in_file_order(llama):
    res = preflight(inputs(llama.base, llama.expert, llama.aligned))
    ref = Checkpoint(llama.base)
    assert [t.name for t in res.tensors] == sorted(ref.tensors, key=lambda n: ref.tensors[n].offset)
    assert all(t.dtype == "BF16" and t.shape == ref.tensors[t.name].shape for t in res.tensors)
    assert res.estimate_bytes == sum(t.nbytes for t in ref.tensors.values())
    assert res.vocab_size == 320 and not res.vocab_rows and not res.dropped


def test_out_dtype_and_resume_estimate(llama, tmp_path):
    res = preflight(
        inputs(llama.base, llama.expert), out_dtype=torch.float32, finished_bytes=1000, extra_bytes=7
    )
    assert {t.dtype for t in res.tensors} == {"F32"}
    assert res.estimate_bytes == sum(t.numel * 4 for t in res.tensors) - 1000 + 7
    shards = plan_shards(res.tensors, 50_000)
    assert [t for s in shards for t in s.tensors] == res.tensors
    assert all(s.data_bytes <= 50_000 or len(s.tensors) == 1 for s in shards)


def test_reads_headers_only(llama, tmp_path):
    """Tensor data full of NaN passes preflight: it never looks at the data."""
    poisoned = tmp_path / "expert"
    shutil.copytree(llama.expert, poisoned)
    sd = load_file(str(poisoned / "model.safetensors"))
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in sd.items()}, str(poisoned / "model.safetensors")
    )
    assert preflight(inputs(llama.base, poisoned)).tensors


def test_tied_embeddings(qwen, llama, tmp_path):
    res = preflight(inputs(qwen.base, qwen.expert, qwen.aligned))
    assert "lm_head.weight" not in {t.name for t in res.tensors}
    # a tied model that also stores lm_head.weight: the head is left out (the output ties it)
    with_head = tmp_path / "with_head"
    shutil.copytree(qwen.expert, with_head)
    sd = load_file(str(with_head / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(with_head / "model.safetensors"), metadata={"format": "pt"})
    res = preflight(inputs(qwen.base, with_head))
    assert res.dropped == ["lm_head.weight"]
    # tied and untied models do not mix
    with pytest.raises(PreflightError, match="tie_word_embeddings differ"):
        preflight(inputs(qwen.base, llama.expert))


def test_untied_model_without_head_is_reported(llama, tmp_path):
    headless = tmp_path / "headless"
    shutil.copytree(llama.expert, headless)
    sd = load_file(str(headless / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(headless / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PreflightError) as info:
        preflight(inputs(llama.base, headless))
    text = str(info.value)
    assert "domain: no lm_head.weight although tie_word_embeddings is false" in text
    assert "'lm_head.weight': in base, missing in domain" in text


def test_vocab_policy_merge_shared_plans_rows(llama, tmp_path):
    from tests.helpers.models import make_model

    bigger = make_model(tmp_path / "big", "llama", seed=3, vocab_size=336)
    with pytest.raises(PreflightError, match="config vocab_size differs: base: 320, domain: 336"):
        preflight(inputs(llama.base, bigger))
    res = preflight(inputs(llama.base, bigger), vocab_policy="merge_shared", vocab_source="domain")
    rows = res.vocab_rows["model.embed_tokens.weight"]
    assert (rows.shared, rows.out_rows, rows.source) == (320, 336, "domain")
    assert res.vocab_size == 336
    assert {t.name: t.shape for t in res.tensors}["lm_head.weight"] == (336, 64)
    res = preflight(inputs(llama.base, bigger), vocab_policy="merge_shared", vocab_source="base")
    assert res.vocab_rows["lm_head.weight"].out_rows == 320 and res.vocab_size == 320
    with pytest.raises(PreflightError, match="vocab_source 'nobody'"):
        preflight(inputs(llama.base, bigger), vocab_policy="merge_shared", vocab_source="nobody")


def test_many_mismatches_are_capped_but_counted(llama, tmp_path, monkeypatch):
    half = tmp_path / "half"
    shutil.copytree(llama.expert, half)
    sd = load_file(str(half / "model.safetensors"))
    save_file({k: v.half() for k, v in sd.items()}, str(half / "model.safetensors"))
    with pytest.raises(PreflightError) as info:
        preflight(inputs(llama.base, half))
    assert len(info.value.problems) == 21 and all("dtypes differ" in p for p in info.value.problems)
    monkeypatch.setattr("mergealign.preflight.MAX_LISTED", 5)
    with pytest.raises(PreflightError) as info:
        preflight(inputs(llama.base, half))
    assert len(info.value.problems) == 6 and info.value.problems[-1] == "... and 16 more dtype problem(s)"
