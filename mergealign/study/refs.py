"""Typed references to the models of a study: base, aligned, an expert, a merge, a judge.

Written in configs and shown in outputs as `base`, `aligned`, `expert:<name>`, `merge:<id>`, `judge:<name>`;
code holds a ModelRef and asks it, never slices the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RefKind = Literal["base", "aligned", "expert", "merge", "judge"]
NAMED_KINDS = ("expert", "merge", "judge")
SINGLE_KINDS = ("base", "aligned")


@dataclass(frozen=True, order=True)
class ModelRef:
    kind: RefKind
    name: str | None = None

    def __post_init__(self) -> None:
        if (self.kind in NAMED_KINDS) != (self.name is not None):
            raise ValueError(
                f"model reference {self.kind!r}: {'needs' if self.kind in NAMED_KINDS else 'takes no'} a name"
            )

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """`base`, `aligned`, `expert:<name>`, `merge:<id>` or `judge:<name>`; ValueError otherwise."""
        kind, sep, name = str(text).partition(":")
        if kind in SINGLE_KINDS and not sep:
            return cls(kind)  # type: ignore[arg-type]
        if kind in NAMED_KINDS and sep and name:
            return cls(kind, name)  # type: ignore[arg-type]
        raise ValueError(
            f"{text!r} is not a model: write base, aligned, expert:<name>, merge:<id> or judge:<name>"
        )

    def __str__(self) -> str:
        return self.kind if self.name is None else f"{self.kind}:{self.name}"

    @property
    def is_input(self) -> bool:
        """A checkpoint the study starts from (base, aligned, an expert), as opposed to a merge or a judge."""
        return self.kind in ("base", "aligned", "expert")

    @property
    def report_name(self) -> str:
        """The model's row name in reports: `base`, `aligned`, `expert-<name>`, the merge's id."""
        if self.kind == "expert":
            return f"expert-{self.name}"
        return self.name if self.kind == "merge" else str(self)


BASE = ModelRef("base")
ALIGNED = ModelRef("aligned")


def expert(name: str) -> ModelRef:
    return ModelRef("expert", name)


def merge(merge_id: str) -> ModelRef:
    return ModelRef("merge", merge_id)


def judge(name: str) -> ModelRef:
    return ModelRef("judge", name)
