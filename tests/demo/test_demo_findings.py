"""The demo's findings (mergealign.demo.findings): what the numbers say, computed from the per-model rows;
the shares are checked against the formula written out here."""

from __future__ import annotations

import pytest

from mergealign.demo.findings import findings


def _row(model: str, kind: str, domain: float | None, refusal: float | None, over: float | None) -> dict:
    return {"model": model, "kind": kind, "domain_acc": domain, "refusal_harmful": refusal,
            "over_refusal_benign": over}  # fmt: skip


def test_findings_state_what_the_numbers_show_either_way():
    rows = [
        _row("base", "base", 30.0, 10.0, 2.0),
        _row("aligned", "aligned", 32.0, 90.0, 8.0),
        _row("expert-pharma", "expert", 70.0, 5.0, 1.0),
        _row("pharma-mergealign-interp-l0.5", "merge", 50.0, 85.0, 9.0),
        _row("pharma-ties", "merge", 66.0, 78.0, 4.0),
    ]
    lines, table = findings(rows, "pharma")
    by = {t["model"]: t for t in table}
    # share of a gain kept = (merged − base) / (source − base), written out independently here
    assert by["pharma-mergealign-interp-l0.5"]["keeps_knowledge"] == pytest.approx((50 - 30) / (70 - 30))
    assert by["pharma-mergealign-interp-l0.5"]["keeps_safety"] == pytest.approx((85 - 10) / (90 - 10))
    assert by["pharma-ties"]["keeps_knowledge"] == pytest.approx((66 - 30) / (70 - 30))
    assert by["pharma-ties"]["over_refusal_vs_aligned"] == pytest.approx(4.0 - 8.0)
    text = "\n".join(lines)
    assert "does NOT keep the expert's knowledge (50.0 %, 50 % of the expert's gain)" in text
    assert "keeps the aligned model's safety (85.0 % refusals, 94 % of the aligned model's gain)" in text
    assert "Merges that keep at least 80 % of both gains: pharma-ties." in text
    # no usable expert: said so, and no share is invented
    flat = [_row("base", "base", 30.0, 10.0, 2.0), _row("aligned", "aligned", 30.0, 90.0, 8.0),
            _row("expert-pharma", "expert", 30.0, 5.0, 1.0), _row("pharma-mergealign-interp-l0.5", "merge", 30, 80, 5)]  # fmt: skip
    lines, table = findings(flat, "pharma")
    assert table[0]["keeps_knowledge"] is None
    assert any("did not produce a usable expert" in line for line in lines)
    assert any("No merge keeps 80 % of both" in line for line in lines)
