"""CLI: `prompts`, `generate`, `judge`, `safety-metrics`, `eval-domain`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mergealign.errors import ConfigError

app = typer.Typer(add_completion=False)


def _runtime(
    backend: str,
    python: str | None,
    dtype: str,
    device: str,
    batch_size: int,
    tensor_parallel_size: int,
    gpu_memory_utilization: float,
    max_model_len: int | None,
    enforce_eager: bool,
    trust_remote_code: bool,
):
    from mergealign.generation.settings import RuntimeSettings

    try:
        return RuntimeSettings(
            backend=backend,
            python=python,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None


def _echo(summary) -> None:
    typer.echo(json.dumps(summary if isinstance(summary, dict) else summary.__dict__, indent=2, default=str))


@app.command("prompts")
def prompts_command(
    prompts: str = typer.Argument(..., help="a named prompt set or a local jsonl/json/csv/parquet/txt file"),
    out: Path = typer.Argument(..., help="canonical prompt JSONL to write"),
    n: int | None = typer.Option(None, "--n", help="sample n prompts (default: all)"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    prompt_column: str = typer.Option("prompt", help="local files: the prompt column"),
    category_column: str | None = typer.Option(None, help="local files: the category column"),
    id_column: str | None = typer.Option(None, help="local files: the id column"),
    kind: str = typer.Option("harmful", help="local files: harmful | benign"),
    kind_column: str | None = typer.Option(None, help="local files: column saying safe/unsafe per row"),
    list_sets: bool = typer.Option(False, "--list", help="list the named prompt sets and exit"),
) -> None:
    """Resolve a prompt set (named, bundled or local), sample it with a seed, write canonical JSONL."""
    from mergealign.datasets import NAMED_SETS, PromptSetSpec, write_prompt_set

    if list_sets:
        for named in NAMED_SETS.values():
            typer.echo(f"{named.name:20s} {named.description}")
        return
    overrides = {
        "prompt_column": prompt_column,
        "category_column": category_column,
        "id_column": id_column,
        "kind": kind,
        "kind_column": kind_column,
    }
    spec = PromptSetSpec.parse(prompts)
    if spec.path is not None:
        spec = PromptSetSpec.parse(prompts, **overrides)
    _echo(write_prompt_set(spec, out, n=n, seed=seed))


@app.command("generate")
def generate_command(
    model: str = typer.Argument(..., help="model directory or hub id"),
    prompts: str = typer.Argument(..., help="prompt JSONL (canonical), a local file, or a named prompt set"),
    out: Path = typer.Argument(..., help="generations JSONL to write"),
    backend: str = typer.Option("transformers", help="vllm | transformers"),
    max_tokens: int = typer.Option(512, help="maximum new tokens per answer"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    system_prompt: str | None = typer.Option(None),
    chat_template: str | None = typer.Option(
        None,
        help="for models without one: a model dir (e.g. the aligned model), a .jinja file or template text",
    ),
    python: str | None = typer.Option(None, help="interpreter of the child process"),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    batch_size: int = typer.Option(8, help="transformers batch size"),
    tensor_parallel_size: int = typer.Option(1),
    gpu_memory_utilization: float = typer.Option(0.9),
    max_model_len: int | None = typer.Option(None),
    enforce_eager: bool = typer.Option(False),
    trust_remote_code: bool = typer.Option(False),
    n: int | None = typer.Option(None, "--n", help="sample n prompts first (named sets / other files)"),
    sample_seed: int = typer.Option(0, help="seed of that sample"),
    prompt_column: str = typer.Option("prompt", help="local non-canonical files: the prompt column"),
    category_column: str | None = typer.Option(None, help="local non-canonical files: the category column"),
) -> None:
    """Generate one answer per prompt, in a child process; re-running resumes a killed run."""
    from mergealign.datasets import PromptSetSpec, write_prompt_set
    from mergealign.generation import GenerationSettings, generate

    runtime = _runtime(backend, python, dtype, device, batch_size, tensor_parallel_size, gpu_memory_utilization,
                       max_model_len, enforce_eager, trust_remote_code)  # fmt: skip
    try:
        settings = GenerationSettings(runtime=runtime, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                      seed=seed, system_prompt=system_prompt, chat_template=chat_template)  # fmt: skip
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    prompts_path = Path(prompts)
    canonical = (
        prompts_path.suffix == ".jsonl"
        and prompts_path.is_file()
        and n is None
        and _is_canonical(prompts_path)
    )
    if not canonical:
        spec = PromptSetSpec.parse(prompts)
        if spec.path is not None:
            spec = PromptSetSpec.parse(prompts, prompt_column=prompt_column, category_column=category_column)
        prompts_path = out.with_name(f"{out.stem}.prompts.jsonl")
        write_prompt_set(spec, prompts_path, n=n, seed=sample_seed)
    _echo(generate(model, prompts_path, out, settings))


def _is_canonical(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and "id" in row and "prompt" in row
    return False


@app.command("judge")
def judge_command(
    generations: Path = typer.Argument(..., help="generations JSONL"),
    out: Path = typer.Argument(..., help="judged JSONL to write"),
    judge_name: str = typer.Option(
        ..., "--judge", help="llama-guard-3 | refusal | harmbench-classifier | md-judge"
    ),
    model: str | None = typer.Option(None, help="judge model dir or hub id (default per judge)"),
    backend: str = typer.Option("transformers", help="vllm | transformers"),
    python: str | None = typer.Option(None),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    batch_size: int = typer.Option(8),
    tensor_parallel_size: int = typer.Option(1),
    gpu_memory_utilization: float = typer.Option(0.9),
    max_model_len: int | None = typer.Option(None),
    max_tokens: int | None = typer.Option(None, help="default per judge"),
    variant: str = typer.Option("auto", help="llama-guard-3: auto | 8b | 1b"),
    prompt_template: str | None = typer.Option(None, help="harmbench-classifier / md-judge prompt file"),
    refusal_keywords: str | None = typer.Option(None, help="refusal keyword list JSON"),
) -> None:
    """Judge every answer: safe/unsafe + categories (safety judges) and refused (all judges)."""
    from mergealign.judges import JudgeSettings, judge

    runtime = _runtime(backend, python, dtype, device, batch_size, tensor_parallel_size, gpu_memory_utilization,
                       max_model_len, False, False)  # fmt: skip
    try:
        settings = JudgeSettings(model=model, runtime=runtime, max_tokens=max_tokens, llama_guard_variant=variant,
                                 prompt_template=prompt_template, refusal_keywords=refusal_keywords)  # fmt: skip
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    _echo(judge(judge_name, generations, out, settings))


@app.command("safety-metrics")
def safety_metrics_command(
    judged: list[Path] = typer.Argument(..., help="judged JSONL files"),
    out: Path = typer.Option(..., "--out", help="metrics JSON to write"),
    n_bootstrap: int = typer.Option(1000, "--bootstrap"),
    seed: int = typer.Option(0),
) -> None:
    """% safe, % refusal, over-refusal, unparseable per judge, prompt set and category, with 95% CIs."""
    from mergealign.evaluation.safety import safety_metrics

    result = safety_metrics(judged, out, n_bootstrap=n_bootstrap, seed=seed)
    for judge_name, data in result["judges"].items():
        overall = data["overall"]
        safe = overall["safe_pct"]
        typer.echo(
            f"{judge_name}: n={overall['n']} safe={safe['value']:.1f}%"
            if safe
            else f"{judge_name}: n={overall['n']}"
        )


@app.command("eval-domain")
def eval_domain_command(
    model: str = typer.Argument(..., help="model directory or hub id"),
    out: Path = typer.Option(..., "--out", help="results JSON to write"),
    preset: str | None = typer.Option(None, help="medicine | finance"),
    tasks: list[str] | None = typer.Option(None, "--tasks", help="lm-eval task, local task or YAML path"),
    backend: str = typer.Option("hf", help="hf | vllm (GPU only)"),
    python: str | None = typer.Option(None),
    data_dir: str | None = typer.Option(None, help="local task data (default $MERGEALIGN_DOMAIN_DATA)"),
    dtype: str = typer.Option("auto"),
    device: str | None = typer.Option(None),
    batch_size: str = typer.Option("8"),
    num_fewshot: int | None = typer.Option(None),
    limit: float | None = typer.Option(None, help="testing only"),
    apply_chat_template: bool = typer.Option(False),
    seed: int = typer.Option(0),
) -> None:
    """Domain benchmarks through lm-eval: per-task accuracy ± stderr and the average, as JSON."""
    from mergealign.evaluation.domain import PRESETS, DomainEvalSettings, evaluate_domain

    if (preset is None) == (not tasks):
        raise ConfigError([f"give exactly one of --preset ({', '.join(PRESETS)}) or --tasks"])
    try:
        settings = DomainEvalSettings(
            backend=backend,
            python=python,
            data_dir=data_dir,
            dtype=dtype,
            device=device,
            batch_size="auto" if batch_size == "auto" else int(batch_size),
            num_fewshot=num_fewshot,
            limit=int(limit) if limit is not None and limit >= 1 else limit,
            apply_chat_template=apply_chat_template,
            seed=seed,
        )
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    result = evaluate_domain(model, preset if preset is not None else list(tasks or []), out, settings)
    for name, entry in result["tasks"].items():
        if entry["acc"] is not None:
            typer.echo(f"{name}: acc {entry['acc']:.4f} ± {entry['acc_stderr'] or 0:.4f} (n={entry['n']})")
    if result["average"]["acc"] is not None:
        typer.echo(f"average: {result['average']['acc']:.4f} over {result['average']['n_tasks']} task(s)")
