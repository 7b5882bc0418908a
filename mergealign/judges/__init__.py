"""Judges of generated answers: llama-guard-3, refusal keywords, harmbench-classifier, md-judge."""

from mergealign.judges.llama_guard import GuardVerdict, detect_variant, parse_llama_guard
from mergealign.judges.refusal import judge_refusal, load_refusal_list, refusal_list_sha256
from mergealign.judges.run import KNOWN_JUDGES, JudgeSettings, JudgeSummary, judge

__all__ = [
    "KNOWN_JUDGES",
    "GuardVerdict",
    "JudgeSettings",
    "JudgeSummary",
    "detect_variant",
    "judge",
    "judge_refusal",
    "load_refusal_list",
    "parse_llama_guard",
    "refusal_list_sha256",
]
