"""Domain benchmarks through real lm-eval (hf backend) on a tiny model, and the offline errors."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from mergealign.errors import ConfigError, MergeAlignError
from mergealign.evaluation.domain import PRESETS, DomainEvalSettings, evaluate_domain
from tests.helpers.evaluation import multiple_choice_accuracy, write_jsonl

QA = [
    {"question": "Which organ pumps blood?", "choices": ["heart", "liver", "lung", "skin"], "answer": 0},
    {"question": "What do lungs exchange?", "choices": ["bones", "gases", "blood", "salt"], "answer": 1},
    {"question": "Where is insulin made?", "choices": ["brain", "kidney", "pancreas", "heart"], "answer": 2},
    {"question": "Which vitamin comes from sunlight?", "choices": ["C", "B12", "A", "D"], "answer": 3},
    {"question": "How many chambers has the heart?", "choices": ["two", "four", "six", "one"], "answer": 1},
    {"question": "Which cells carry oxygen?", "choices": ["red cells", "nerves", "fat", "hair"], "answer": 0},
]
FPB = [
    {"sentence": "Profits rose sharply this quarter.", "label": "positive"},
    {"sentence": "The company reported a heavy loss.", "label": "negative"},
    {"sentence": "The meeting is scheduled for Monday.", "label": "neutral"},
    {"sentence": "Sales fell by ten percent.", "label": "negative"},
    {"sentence": "Revenue grew strongly.", "label": "positive"},
]
TASK_YAML = """task: tiny_med_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data}"
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{ question }}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
FPB_CHOICES = ["negative", "neutral", "positive"]


@pytest.mark.slow
def test_lm_eval_hf_backend_on_local_tasks(tmp_path, chat_model):
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    qa_file = write_jsonl(tmp_path / "qa.jsonl", QA)
    (task_dir / "tiny_med_mc.yaml").write_text(TASK_YAML.format(data=qa_file))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_jsonl(data_dir / "fpb.jsonl", FPB)
    settings = DomainEvalSettings(dtype="float32", device="cpu", batch_size=4, data_dir=str(data_dir))
    result = evaluate_domain(
        chat_model, [str(task_dir / "tiny_med_mc.yaml"), "fpb_local"], tmp_path / "r.json", settings
    )
    assert json.loads((tmp_path / "r.json").read_text()) == result

    qa_correct = multiple_choice_accuracy(
        chat_model,
        QA,
        lambda d: f"Question: {d['question']}\nAnswer:",
        lambda d: d["choices"],
        lambda d: d["answer"],
    )
    fpb_correct = multiple_choice_accuracy(
        chat_model,
        FPB,
        lambda d: (
            f"Sentence: {d['sentence']}\nIs the sentiment of this financial news sentence negative, "
            "neutral or positive?\nAnswer:"
        ),
        lambda d: FPB_CHOICES,
        lambda d: FPB_CHOICES.index(d["label"]),
    )
    for name, correct in (("tiny_med_mc", qa_correct), ("fpb_local", fpb_correct)):
        task = result["tasks"][name]
        assert task["n"] == len(correct)
        assert task["acc"] == pytest.approx(sum(correct) / len(correct))
        assert task["acc_stderr"] == pytest.approx(statistics.stdev(correct) / math.sqrt(len(correct)))
    accs = [result["tasks"][n]["acc"] for n in ("tiny_med_mc", "fpb_local")]
    assert result["average"]["acc"] == pytest.approx(sum(accs) / 2) and result["average"]["n_tasks"] == 2
    assert result["data_files"]["fpb_local"]["path"] == str((data_dir / "fpb.jsonl").resolve())
    assert result["backend"] == "hf" and result["lm_eval_version"]


def test_presets_offline_name_every_missing_input(tmp_path, chat_model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("MERGEALIGN_DOMAIN_DATA", raising=False)
    with pytest.raises(MergeAlignError) as info:
        evaluate_domain(chat_model, "medicine", tmp_path / "r.json")
    message = str(info.value)
    assert "pubmedqa_local" in message and "pubmedqa.jsonl" in message and "MERGEALIGN_DOMAIN_DATA" in message
    assert "GBaker/MedQA-USMLE-4-options-hf" in message and "cais/mmlu (anatomy)" in message
    (tmp_path / "data").mkdir()
    with pytest.raises(MergeAlignError) as info:
        evaluate_domain(
            chat_model, "finance", tmp_path / "r.json", DomainEvalSettings(data_dir=str(tmp_path / "data"))
        )
    for name in ("fpb.jsonl", "fiqa_sa.jsonl", "headline.jsonl", "cais/mmlu (econometrics)"):
        assert name in str(info.value)
    assert not (tmp_path / "r.json").exists()


def test_unknown_preset_and_bad_yaml(tmp_path, chat_model):
    with pytest.raises(ConfigError) as info:
        evaluate_domain(chat_model, "law", tmp_path / "r.json")
    assert all(name in str(info.value) for name in PRESETS)
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate_domain(chat_model, [str(tmp_path / "nope.yaml")], tmp_path / "r.json")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(ConfigError, match="has no `task:`"):
        evaluate_domain(chat_model, [str(bad)], tmp_path / "r.json")
