"""Linear CKA against the HSIC formula with an explicit centring matrix; per-layer CKA on tiny real models."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from mergealign.cka import compute_cka, linear_cka, read_prompts
from mergealign.errors import MergeAlignError
from tests.helpers.models import make_trio


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA = HSIC(K, L) / √(HSIC(K, K)·HSIC(L, L)), HSIC(K, L) = tr(K H L H), H = I − 11ᵀ/n."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l_ = x.double() @ x.double().T, y.double() @ y.double().T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h)

    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


@pytest.mark.parametrize("n,p,q", [(12, 30, 20), (80, 10, 6)])  # Gram form and feature form
def test_linear_cka_matches_hsic_formula(n, p, q):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, p, generator=g)
    y = x[:, :q] @ torch.randn(q, q, generator=g) + 0.5 * torch.randn(n, q, generator=g)
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-9)
    q_, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    assert linear_cka(x, 3.0 * (x.double() @ q_) + 7.0) == pytest.approx(
        1.0, abs=1e-9
    )  # orthogonal, scale, shift
    assert 0.0 <= linear_cka(x, torch.randn(n, q, generator=g)) < 1.0
    with pytest.raises(MergeAlignError):
        linear_cka(x, y[:-1])


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("cka"), arch="llama", noise=0.05)


PROMPTS = [
    "The patient presented with a mild fever.",
    "How do I bake bread?",
    "Interest rates rose this quarter.",
    "Take two tablets with water.",
    "Merging models adds task vectors.",
]


def test_per_layer_cka_on_tiny_models(trio):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = compute_cka({"base": trio.base, "expert": trio.expert}, PROMPTS, pool="mean")
    assert res.n_layers == 3 and res.n_prompts == 5 and res.n_rows == 5  # embeddings + 2 blocks
    m = res.matrix(2)
    assert 0.0 < m[("base", "expert")] < 1.0
    # independent path: run the models by hand and pool the last layer
    tok = AutoTokenizer.from_pretrained(str(trio.base))

    def pooled(path, layer):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        rows = []
        with torch.no_grad():
            for t in PROMPTS:
                out = model(**tok(t, return_tensors="pt"), output_hidden_states=True)
                rows.append(out.hidden_states[layer][0].mean(0))
        return torch.stack(rows)

    want = hsic_cka(pooled(trio.base, 2), pooled(trio.expert, 2))
    assert m[("base", "expert")] == pytest.approx(want, rel=1e-6)


def test_cli_cka_and_bad_input(trio, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    out = tmp_path / "cka.json"
    r = CliRunner().invoke(
        app,
        [
            "cka",
            f"base={trio.base}",
            f"aligned={trio.aligned}",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--pool",
            "tokens",
            "--max-tokens",
            "6",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert (
        doc["models"] == ["base", "aligned"] and doc["pool"] == "tokens" and len(doc["pairs"][0]["cka"]) == 3
    )
    assert 3 < doc["n_rows"] <= 18  # every token of 3 prompts, at most 6 each
    assert all(0.0 < v <= 1.0 + 1e-9 for v in doc["pairs"][0]["cka"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(MergeAlignError, match="no 'prompt'"):
        read_prompts(bad)
    with pytest.raises(MergeAlignError, match="at least two"):
        compute_cka({"base": trio.base}, PROMPTS)
