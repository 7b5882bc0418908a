"""`judge`: a verdict on every generated answer, as JSONL.

Output row (one per input row, same order): every input field, plus
  judge: {"name", "version", "model", "refusal_version"}
  refused: bool (the refusal keyword judge; the only verdict of the `refusal` judge)
  refusal_match: the refusal phrase found, or null
and for safety judges (llama-guard-3, harmbench-classifier, md-judge):
  safe: bool, null when unparseable; categories: list of codes; p_unsafe: float or null;
  unparseable: bool; judge_output: the judge model's raw text.
Empty responses are judged like any other.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mergealign.errors import ConfigError, MergeAlignError
from mergealign.files import (
    canonical_json,
    iter_jsonl,
    read_complete_jsonl_rows,
    sha256_file,
    write_jsonl,
)
from mergealign.generation.generate import model_identity
from mergealign.generation.runner import discard_partial, run_model
from mergealign.generation.settings import RuntimeSettings
from mergealign.generation.templates import load_tokenizer, template_text
from mergealign.judges.classifiers import (
    HARMBENCH_TEMPLATE,
    MD_JUDGE_TEMPLATE,
    load_template,
    parse_md_judge,
    parse_yes_no,
    render,
)
from mergealign.judges.llama_guard import PARSER_VERSION, GuardVerdict, detect_variant, parse_llama_guard
from mergealign.judges.refusal import RefusalList, judge_refusal, load_refusal_list

logger = logging.getLogger(__name__)

JUDGE_CODE_VERSION = "judge-v1"


@dataclass(frozen=True)
class ModelJudgeSpec:
    name: str
    default_model: str
    max_tokens: int
    score_tokens: tuple[str, str]  # (unsafe token, safe token): p_unsafe = P(first verdict token = unsafe)
    version: str
    template: Path | None  # raw-prompt judges; None = the judge model's chat template on [user, assistant]


MODEL_JUDGES = {
    "llama-guard-3": ModelJudgeSpec(
        "llama-guard-3", "meta-llama/Llama-Guard-3-8B", 20, ("unsafe", "safe"), PARSER_VERSION, None
    ),
    "harmbench-classifier": ModelJudgeSpec(
        "harmbench-classifier",
        "cais/HarmBench-Llama-2-13b-cls",
        4,
        ("Yes", "No"),
        "harmbench-classifier-v1",
        HARMBENCH_TEMPLATE,
    ),
    "md-judge": ModelJudgeSpec(
        "md-judge", "OpenSafetyLab/MD-Judge-v0.1", 32, ("unsafe", "safe"), "md-judge-v1", MD_JUDGE_TEMPLATE
    ),
}
KNOWN_JUDGES = ("llama-guard-3", "refusal", "harmbench-classifier", "md-judge")
PROBE_USER = "mergealign-probe-user-7f3a"
PROBE_AGENT = "mergealign-probe-agent-9c1e"


class JudgeSettings(BaseModel):
    """Settings of a judge run. Model judges run on the same backends (and child processes) as generation."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="judge model dir or hub id; default per judge")
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    max_tokens: int | None = Field(default=None, ge=1, description="default per judge (llama-guard-3: 20)")
    llama_guard_variant: Literal["auto", "8b", "1b"] = "auto"
    prompt_template: str | None = Field(
        default=None, description="harmbench-classifier / md-judge template file"
    )
    refusal_keywords: str | None = Field(default=None, description="keyword list JSON; default: bundled v1")

    def cache_fingerprint(self, name: str) -> str:
        """Everything of the settings and code that changes a judge's verdicts (not the input file)."""
        check_judge_name(name)
        payload: dict[str, Any] = {
            "name": name,
            "code": JUDGE_CODE_VERSION,
            "refusal": load_refusal_list(self.refusal_keywords).sha256,
        }
        if name in MODEL_JUDGES:
            spec = MODEL_JUDGES[name]
            payload.update(
                version=spec.version,
                model=model_identity(self.model or spec.default_model),
                runtime=self.runtime.output_affecting(),
                max_tokens=self.max_tokens or spec.max_tokens,
                variant=self.llama_guard_variant,
                template=sha256_file(self.prompt_template or spec.template) if spec.template else None,
            )
        return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


@dataclass
class JudgeSummary:
    out_path: str
    judge: str
    version: str
    model: str | None
    n_rows: int
    n_safe: int | None
    n_unsafe: int | None
    n_unparseable: int | None
    n_refused: int
    n_empty_responses: int
    seconds: float
    skipped: bool
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_judge_name(name: str) -> None:
    if name not in KNOWN_JUDGES:
        raise ConfigError([f"judge: unknown judge {name!r}; known judges: {', '.join(KNOWN_JUDGES)}"])


def read_generations(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        raise MergeAlignError(f"generations file {path} does not exist")
    rows = []
    for number, row in enumerate(iter_jsonl(path), start=1):
        missing = [k for k in ("id", "prompt", "response") if k not in row]
        if missing:
            raise MergeAlignError(
                f"generations file {path}, line {number}: no field(s) {', '.join(missing)}; "
                f"its fields are: {', '.join(row) or '(none)'}"
            )
        if row["response"] is None:
            row["response"] = ""
        if not isinstance(row["response"], str) or not isinstance(row["prompt"], str):
            raise MergeAlignError(f"generations file {path}, line {number}: prompt and response must be text")
        rows.append(row)
    if not rows:
        raise MergeAlignError(f"generations file {path} holds no rows")
    return rows


def _probe_chat_template(model: str, tokenizer: Any, name: str) -> tuple[str, str]:
    """The content format ('string' or 'openai') under which the judge's template renders [user, assistant]."""
    template = template_text(tokenizer)
    if not template:
        raise MergeAlignError(
            f"judge {name}: model {model} has no chat template to render [user, assistant] with"
        )
    problems = []
    for content_format in ("string", "openai"):
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": PROBE_USER},
            {"role": "assistant", "content": PROBE_AGENT},
        ]
        if content_format == "openai":
            messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            problems.append(f"{content_format} content: {type(exc).__name__}: {exc}")
            continue
        if PROBE_USER in rendered and PROBE_AGENT in rendered:
            return template, content_format
        problems.append(
            f"{content_format} content: the rendered prompt leaves out the "
            f"{'user' if PROBE_USER not in rendered else 'assistant'} message"
        )
    raise MergeAlignError(
        f"judge {name}: the chat template of {model} does not take a [user, assistant] conversation ("
        + "; ".join(problems)
        + "); a response-classification judge must see both the prompt and the answer"
    )


def _existing(out_path: Path, ids: list[str], fingerprint: str) -> list[dict[str, Any]] | None:
    if not out_path.is_file():
        return None
    rows = read_complete_jsonl_rows(out_path)
    if [str(r.get("id")) for r in rows] == ids and all(
        r.get("judge_fingerprint") == fingerprint for r in rows
    ):
        return rows
    return None


def _summary(
    out: Path,
    name: str,
    version: str,
    model: str | None,
    rows: list[dict[str, Any]],
    seconds: float,
    skipped: bool,
    fingerprint: str,
) -> JudgeSummary:
    safety = name in MODEL_JUDGES
    return JudgeSummary(
        out_path=str(out),
        judge=name,
        version=version,
        model=model,
        n_rows=len(rows),
        n_safe=sum(r.get("safe") is True for r in rows) if safety else None,
        n_unsafe=sum(r.get("safe") is False for r in rows) if safety else None,
        n_unparseable=sum(bool(r.get("unparseable")) for r in rows) if safety else None,
        n_refused=sum(bool(r["refused"]) for r in rows),
        n_empty_responses=sum(not (r.get("response") or "").strip() for r in rows),
        seconds=seconds,
        skipped=skipped,
        fingerprint=fingerprint,
    )


def judge(
    name: str,
    generations_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    settings: JudgeSettings | None = None,
) -> JudgeSummary:
    """Judge every row of `generations_path` with judge `name` (one of KNOWN_JUDGES) into `out_path`."""
    check_judge_name(name)
    settings = settings or JudgeSettings()
    started = time.perf_counter()
    out = Path(out_path)
    rows = read_generations(generations_path)
    keywords = load_refusal_list(settings.refusal_keywords)
    fingerprint = hashlib.sha256(
        canonical_json(
            {"input": sha256_file(generations_path), "judge": settings.cache_fingerprint(name)}
        ).encode()
    ).hexdigest()
    ids = [str(r["id"]) for r in rows]
    spec = MODEL_JUDGES.get(name)
    model = (settings.model or spec.default_model) if spec else None
    version = spec.version if spec else keywords.judge_version

    existing = _existing(out, ids, fingerprint)
    if existing is not None:
        logger.info("judge %s: %s is complete, nothing to do", name, out)
        return _summary(out, name, version, model, existing, 0.0, True, fingerprint)

    if spec is None:
        judged = [_with_refusal(dict(row), keywords, {"name": name, "version": version}) for row in rows]
    else:
        judged = _run_model_judge(
            spec, model or spec.default_model, rows, out, fingerprint, settings, keywords
        )
    for row in judged:
        row["judge_fingerprint"] = fingerprint
    write_jsonl(out, judged)
    discard_partial(out, fingerprint)
    summary = _summary(out, name, version, model, judged, time.perf_counter() - started, False, fingerprint)
    logger.info(
        "judge %s: %d rows -> %s (safe %s, unsafe %s, unparseable %s, refused %d)",
        name,
        summary.n_rows,
        out,
        summary.n_safe,
        summary.n_unsafe,
        summary.n_unparseable,
        summary.n_refused,
    )
    return summary


def _with_refusal(row: dict[str, Any], keywords: RefusalList, judge_info: dict[str, Any]) -> dict[str, Any]:
    verdict = judge_refusal(row.get("response"), keywords)
    row["judge"] = {**judge_info, "refusal_version": keywords.judge_version}
    row["refused"] = verdict.refused
    row["refusal_match"] = verdict.match
    return row


def _run_model_judge(
    spec: ModelJudgeSpec,
    model: str,
    rows: list[dict[str, Any]],
    out: Path,
    fingerprint: str,
    settings: JudgeSettings,
    keywords: RefusalList,
) -> list[dict[str, Any]]:
    content_format = "string"
    variant = None
    if spec.template is None:
        tokenizer = load_tokenizer(model, settings.runtime.trust_remote_code)
        template, content_format = _probe_chat_template(model, tokenizer, spec.name)
        variant = (
            detect_variant(template)
            if settings.llama_guard_variant == "auto"
            else settings.llama_guard_variant
        )
        inputs = [
            {
                "id": str(r["id"]),
                "messages": [
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["response"]},
                ],
            }
            for r in rows
        ]
    else:
        template = load_template(settings.prompt_template or spec.template)
        inputs = [{"id": str(r["id"]), "text": render(template, r["prompt"], r["response"])} for r in rows]
    sampling = {
        "max_tokens": settings.max_tokens or spec.max_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
        "ignore_eos": False,
        "record_token_ids": False,
        "score_tokens": list(spec.score_tokens),
    }
    result = run_model(
        model=model,
        inputs=inputs,
        out_path=out,
        fingerprint=fingerprint,
        runtime=settings.runtime,
        sampling=sampling,
        content_format=content_format,
        label=f"judge {spec.name}",
    )
    judge_info = {"name": spec.name, "version": spec.version, "model": model}
    if variant:
        judge_info["variant"] = variant
    judged = []
    for row in rows:
        produced = result.rows[str(row["id"])]
        text = produced["response"]
        verdict: GuardVerdict
        if spec.name == "llama-guard-3":
            verdict = parse_llama_guard(text, variant or "8b")
        elif spec.name == "harmbench-classifier":
            verdict = parse_yes_no(text)
        else:
            verdict = parse_md_judge(text)
        logprob = (produced.get("score_logprobs") or {}).get(spec.score_tokens[0])
        out_row = _with_refusal(dict(row), keywords, judge_info)
        out_row.update(
            {
                "safe": verdict.safe,
                "categories": verdict.categories,
                "p_unsafe": math.exp(logprob) if logprob is not None else None,
                "unparseable": verdict.unparseable,
                "judge_output": text,
            }
        )
        judged.append(out_row)
    return judged
