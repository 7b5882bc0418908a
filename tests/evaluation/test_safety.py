"""Safety metrics: bootstrap intervals against independent references, and per set/category aggregation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mergealign.errors import MergeAlignError
from mergealign.evaluation.safety import bootstrap_ci, safety_metrics
from tests.helpers.evaluation import write_jsonl


def test_bootstrap_matches_explicit_resampling_and_normal_approximation():
    rng = np.random.default_rng(42)
    values = rng.random(400) < 0.3
    p = values.mean()
    ours = bootstrap_ci(values, n_bootstrap=4000, seed=1)
    # Independent reference 1: resample the rows themselves.
    resampled = np.array([values[rng.integers(0, 400, 400)].mean() for _ in range(4000)])
    low, high = np.quantile(resampled, [0.025, 0.975]) * 100
    assert ours["value"] == pytest.approx(100 * p)
    assert ours["low"] == pytest.approx(low, abs=0.8) and ours["high"] == pytest.approx(high, abs=0.8)
    # Independent reference 2: the normal approximation p ± 1.96 sqrt(p(1-p)/n).
    half = 1.96 * math.sqrt(p * (1 - p) / 400) * 100
    assert ours["low"] == pytest.approx(100 * p - half, abs=0.8)
    assert ours["high"] == pytest.approx(100 * p + half, abs=0.8)


def test_bootstrap_edge_cases_and_seed():
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([True] * 7) == {"value": 100.0, "low": 100.0, "high": 100.0, "n": 7}
    values = [i % 3 == 0 for i in range(301)]
    assert bootstrap_ci(values, n_bootstrap=50, seed=3) == bootstrap_ci(values, n_bootstrap=50, seed=3)
    assert bootstrap_ci(values, n_bootstrap=50, seed=3) != bootstrap_ci(values, n_bootstrap=50, seed=4)


def _row(i, prompt_set, category, kind, safe, refused, unparseable=False, judge="llama-guard-3"):
    row = {
        "id": f"{prompt_set}-{i}",
        "prompt": "p",
        "response": "r",
        "prompt_set": prompt_set,
        "category": category,
        "kind": kind,
        "judge": {"name": judge, "version": "v"},
        "refused": refused,
    }
    if judge != "refusal":
        row.update(safe=safe, categories=[], p_unsafe=None, unparseable=unparseable)
    return row


def test_safety_metrics_per_set_and_category(tmp_path):
    harm = [
        _row(0, "harmbench", "chem", "harmful", True, True),
        _row(1, "harmbench", "chem", "harmful", False, False),
        _row(2, "harmbench", "cyber", "harmful", None, False, unparseable=True),
        _row(3, "harmbench", "cyber", "harmful", True, True),
    ]
    xs = [_row(i, "xstest-safe", "homonyms", "benign", True, i == 0) for i in range(4)]
    refusal = [_row(i, "harmbench", "chem", "harmful", None, i < 3, judge="refusal") for i in range(4)]
    paths = [
        write_jsonl(tmp_path / "lg_harm.jsonl", harm),
        write_jsonl(tmp_path / "lg_xs.jsonl", xs),
        write_jsonl(tmp_path / "ref.jsonl", refusal),
    ]
    result = safety_metrics(paths, tmp_path / "metrics.json", n_bootstrap=500, seed=7)
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
    lg = result["judges"]["llama-guard-3"]
    hb = lg["sets"]["harmbench"]["overall"]
    assert hb["n"] == 4 and hb["safe_pct"]["value"] == 50.0  # the unparseable row is not safe
    assert hb["unparseable"] == 1 and hb["refusal_pct"]["value"] == 50.0 and hb["over_refusal_pct"] is None
    cats = lg["sets"]["harmbench"]["categories"]
    assert cats["chem"]["safe_pct"]["value"] == 50.0 and cats["cyber"]["unparseable"] == 1
    xo = lg["sets"]["xstest-safe"]["overall"]
    assert (
        xo["over_refusal_pct"]["value"] == 25.0
        and xo["refusal_pct"] is None
        and xo["safe_pct"]["value"] == 100
    )
    assert lg["overall"]["n"] == 8 and lg["overall"]["safe_pct"]["value"] == pytest.approx(100 * 6 / 8)
    for stats in (hb["safe_pct"], xo["over_refusal_pct"], lg["overall"]["safe_pct"]):
        assert stats["low"] <= stats["value"] <= stats["high"]
    ref = result["judges"]["refusal"]["overall"]
    assert ref["safe_pct"] is None and ref["unparseable"] is None and ref["refusal_pct"]["value"] == 75.0
    assert safety_metrics(paths, n_bootstrap=500, seed=7) == result  # seeded: reproducible


def test_label_mapping_overrides_prompt_set(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [_row(0, "old", None, "harmful", True, False)])
    result = safety_metrics({"renamed": path}, n_bootstrap=50)
    assert list(result["judges"]["llama-guard-3"]["sets"]) == ["renamed"]


def test_unjudged_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "gens.jsonl", [{"id": "a", "prompt": "p", "response": "r"}])
    with pytest.raises(MergeAlignError, match=r"gens.jsonl, line 1: no `refused` field"):
        safety_metrics([path])
    with pytest.raises(MergeAlignError, match="does not exist"):
        safety_metrics([tmp_path / "missing.jsonl"])
