"""Errors that users see: each names the file, tensor, parameter or field at fault; and the helpers that word
them (one "did you mean", one formatter of pydantic errors)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


class MergeAlignError(Exception):
    """Base class for every error meant for the user (the CLI prints it and exits non-zero)."""

    exit_code = 1


class CheckpointError(MergeAlignError):
    """A checkpoint file, index or header is missing, truncated, corrupt or refused."""


class PreflightError(MergeAlignError):
    """Inputs do not fit together; lists every problem found from headers and configs."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"preflight found {len(self.problems)} problem(s):\n{lines}")


class ConfigError(MergeAlignError):
    """A config file or parameter is invalid; lists every problem with its field path."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config{where} ({len(self.problems)} problem(s)):\n{lines}")


class HubUnreachableError(MergeAlignError):
    """The hub could not be reached (network, timeout, HTTP 5xx) and no local copy helps: worth a retry,
    unlike a missing repo or revision."""


# --------------------------------------------------------------------------- message helpers
def did_you_mean(name: str, known: Iterable[str], *, n: int = 1, cutoff: float = 0.6) -> str:
    """' (did you mean 'x'?)' for the closest of `known` to a mistyped `name`, or ''."""
    import difflib

    close = difflib.get_close_matches(str(name), list(known), n=n, cutoff=cutoff)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def unknown_name(what: str, name: str, known: Iterable[str], *, cutoff: float = 0.6) -> str:
    """ "unknown <what> 'x' (did you mean 'y'?); known: a, b, c" — the one wording of a bad name."""
    known = sorted(known)
    listed = ", ".join(known) or "none"
    return f"unknown {what} {name!r}{did_you_mean(name, known, cutoff=cutoff)}; known: {listed}"


_UNION_TAGS = ("function-", "union[", "literal[", "list[", "dict[", "tagged-union[", "tuple[")
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "is-instance", "Conditional"}


def field_path(loc: Sequence[Any]) -> str:
    """A pydantic error location as a config path (`merges[2].lambda`); union and validator tags dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str):
            if part.startswith(_UNION_TAGS) or part in _TYPE_TAGS:
                continue
            out += f".{part}" if out else part
    return out or "(top level)"


def _fields_at(root: Any, loc: Sequence[Any]) -> list[str]:
    """Field names (aliases) of the model that holds `loc`'s last element, for 'did you mean' hints."""
    cls: Any = root
    for part in loc[:-1]:
        if not isinstance(part, str) or part.startswith(_UNION_TAGS) or part in _TYPE_TAGS:
            continue
        fields = getattr(cls, "model_fields", None)
        if fields is None:
            return []
        field = next((f for n, f in fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        cls = _model_in(field.annotation)
    fields = getattr(cls, "model_fields", None)
    return [f.alias or n for n, f in fields.items()] if fields else []


def _model_in(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _message(root: Any, err: Mapping[str, Any]) -> str:
    kind, msg, ctx = err.get("type", ""), str(err.get("msg", "")), err.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        known = _fields_at(root, tuple(err["loc"]))
        hint = did_you_mean(str(err["loc"][-1]), known)
        return f"unknown field{hint}" + (f"; known: {', '.join(known)}" if known else "")
    ops = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in ops:
        return f"must be {ops[kind]} {next(iter(ctx.values()), '')}, got {err.get('input')!r}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', '')}, got {err.get('input')!r}"
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg[:1].lower() + msg[1:]


def validation_problems(exc: Any, root: Any) -> list[str]:
    """Every problem of a pydantic ValidationError against model class `root`, as `path: message` lines.

    Union branches repeat one complaint per branch: only the first complaint per path is kept, except for
    unknown and missing fields, which are listed each.
    """
    problems: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        path = field_path(tuple(err["loc"]))
        line = f"{path}: {_message(root, err)}"
        key = line if err.get("type") in ("extra_forbidden", "missing") else path
        if key in seen or line in problems:
            continue
        seen.add(key)
        problems.append(line)
    return problems
