"""CLI: `mergealign similarity`, `mergealign report`, `mergealign contributions`, `mergealign cka`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


@app.command("similarity")
def similarity(
    base: Path = typer.Argument(..., help="base model directory (θ_0)"),
    expert: Path = typer.Argument(..., help="domain expert (τ_D = expert − base)"),
    aligned: Path = typer.Argument(..., help="aligned model (τ_A = aligned − base)"),
    out: Path = typer.Argument(
        ..., help="output directory (similarity.json, tensors.parquet, merged.parquet)"
    ),
    merged: list[str] = typer.Option(
        [], "--merged", help="merged model directory, or LABEL=DIR (repeatable)"
    ),
    ties_density: float = typer.Option(
        0.2, "--ties-density", help="TIES trim density k for the top-k statistics"
    ),
    ties_sample: int = typer.Option(
        65536,
        "--ties-sample",
        help="sample size for the TIES thresholds of larger tensors (0 = exact, slower)",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
) -> None:
    """Norms, cosines, sign conflicts and TIES overlap of τ_D and τ_A (per tensor, layer, module), and how
    each merged model's delta decomposes onto them; one streaming pass."""
    from mergealign.similarity import SimilarityOptions, compute_similarity

    opts = SimilarityOptions(ties_density=ties_density, ties_sample=ties_sample or None)
    res = compute_similarity(base, expert, aligned, merged, out, options=opts, progress=not no_progress)
    o = res.overall()
    typer.echo(
        f"{len(res.tensors)} tensors in {res.seconds:.1f} s: ‖τ_D‖ {_fmt(o['norm_d'])}, ‖τ_A‖ {_fmt(o['norm_a'])}, "
        f"cos(τ_D, τ_A) {_fmt(o['cos_da'])}, sign conflicts {_fmt(o['sign_conflict'])}, "
        f"cos(θ_expert, θ_aligned) {_fmt(o['cos_expert_aligned'], 6)}"
    )
    for label, m in o["merged"].items():
        typer.echo(
            f"  {label}: δ ≈ {_fmt(m['coef_d'])}·τ_D + {_fmt(m['coef_a'])}·τ_A "
            f"(shares {_fmt(m['share_d'])} / {_fmt(m['share_a'])}, residual {_fmt(m['share_residual'])})"
        )
    typer.echo(f"-> {out}")


@app.command("report")
def report(
    run_dir: Path = typer.Argument(..., help="results folder (layout: see mergealign.report.results)"),
    out: Path = typer.Option(None, "--out", help="report folder (default RUN_DIR/report)"),
    embed_images: bool = typer.Option(True, "--embed/--no-embed", help="embed PNGs in report.html as base64"),
) -> None:
    """Build report.md, report.html and PNG plots from a results folder; lists the inputs that are missing."""
    from mergealign.report import build_report

    rep = build_report(run_dir, out, embed_images=embed_images)
    typer.echo(f"report: {rep.markdown}  ({len(rep.rows)} models, {len(rep.plots)} plots)")
    for item in rep.missing:
        typer.echo(f"  missing: {item}")


@app.command("contributions")
def contributions(
    config: Path = typer.Argument(..., help="base MergeAlign merge config (YAML)"),
    out: Path = typer.Argument(
        ..., help="directory for the variant configs (one YAML each) and variants.json"
    ),
    scopes: list[str] = typer.Option(
        [], "--scope", help="vector@part, e.g. align@attn, domain@mlp, align@first_half, align@layers:0-3"
    ),
    lambdas: list[float] = typer.Option([], "--lambda", help="λ values of a sweep (interp preset)"),
    n_layers: int = typer.Option(None, "--layers", help="number of layers (default: from the base model)"),
) -> None:
    """Write the merge configs of contribution variants (a vector only in some modules / layers) and λ sweeps."""
    import yaml

    from mergealign.contributions import contribution_variants, lambda_sweep, load_base_spec

    spec = load_base_spec(config, n_layers=n_layers)
    variants = lambda_sweep(spec, lambdas) + contribution_variants(spec, scopes or None)
    out.mkdir(parents=True, exist_ok=True)
    for v in variants:
        (out / f"{v.name}.yaml").write_text(yaml.safe_dump(v.config, sort_keys=False))
    (out / "variants.json").write_text(json.dumps([v.describe() for v in variants], indent=1))
    for v in variants:
        typer.echo(f"{v.name}: {v.description}")
    typer.echo(f"{len(variants)} variant configs -> {out}")


@app.command("cka")
def cka(
    models: list[str] = typer.Argument(..., help="LABEL=DIR of each model to compare (at least two)"),
    prompts: Path = typer.Option(
        ..., "--prompts", help="text file (one prompt a line) or JSONL with 'prompt'"
    ),
    out: Path = typer.Option(..., "--out", help="output JSON"),
    max_prompts: int = typer.Option(64, "--max-prompts"),
    max_tokens: int = typer.Option(128, "--max-tokens", help="tokens per prompt (truncated)"),
    pool: str = typer.Option("tokens", "--pool", help="tokens | mean | last"),
) -> None:
    """Linear CKA of hidden states per layer between models, on a prompt set (transformers, CPU)."""
    from mergealign.cka import compute_cka, read_prompts
    from mergealign.similarity import split_merged_specs

    specs = split_merged_specs(models)
    texts = read_prompts(prompts)[:max_prompts]
    res = compute_cka(specs, texts, max_tokens=max_tokens, pool=pool)
    res.write(out)
    typer.echo(f"CKA of {len(specs)} models on {len(texts)} prompts, {res.n_layers} layers -> {out}")
