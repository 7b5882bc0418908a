"""Chat templates, checked in the parent before any child process starts: the model's own, else a
configured one (a model directory or hub id whose tokenizer has a template, a .jinja file, or text)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mergealign.errors import MergeAlignError
from mergealign.files import sha256_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedTemplate:
    """`text` is None when the model's own template applies; `source` says where the template came from."""

    text: str | None
    source: str
    sha256: str


@lru_cache(maxsize=16)
def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError offline, ValueError for unknown tokenizer classes, ...
        raise MergeAlignError(
            f"cannot load the tokenizer of {model}: {type(exc).__name__}: {exc}. A hub id must be in the local "
            f"HF cache when offline (HF_HUB_OFFLINE=1); gated models also need HF_TOKEN."
        ) from None


def template_text(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is what chat uses
        template = template.get("default")
    return template or None


def _configured_template(configured: str, trust_remote_code: bool) -> tuple[str, str]:
    path = Path(configured)
    if path.is_dir():
        text = template_text(load_tokenizer(str(path), trust_remote_code))
        if not text:
            raise MergeAlignError(f"configured chat template source {configured} has no chat template either")
        return text, str(path)
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    if "{{" in configured or "{%" in configured:
        return configured, f"inline:{sha256_text(configured)[:12]}"
    if path.suffix in {".jinja", ".j2", ".txt"} or configured.startswith(("/", "./", "../")):
        raise MergeAlignError(f"configured chat template file {configured} does not exist")
    text = template_text(load_tokenizer(configured, trust_remote_code))
    if not text:
        raise MergeAlignError(f"configured chat template source {configured} has no chat template either")
    return text, configured


def resolve_chat_template(
    model: str, configured: str | None, trust_remote_code: bool = False
) -> ResolvedTemplate:
    """The model's own template if it has one, else the configured one; error if neither exists."""
    tokenizer = load_tokenizer(str(model), trust_remote_code)
    own = template_text(tokenizer)
    if own:
        resolved = ResolvedTemplate(text=None, source="model", sha256=sha256_text(own))
        effective = own
    elif configured:
        effective, source = _configured_template(configured, trust_remote_code)
        logger.info("model %s has no chat template: using the one from %s", model, source)
        resolved = ResolvedTemplate(text=effective, source=source, sha256=sha256_text(effective))
    else:
        raise MergeAlignError(
            f"model {model} has no chat template (tokenizer_config.json / chat_template.jinja) and none is "
            f"configured: set the generation setting `chat_template` (a model directory such as the aligned "
            f"model's, a .jinja file, or template text), or `--chat-template` on the command line"
        )
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "probe"}],
            tokenize=False,
            add_generation_prompt=True,
            chat_template=resolved.text,
        )
    except Exception as exc:
        raise MergeAlignError(
            f"chat template ({resolved.source}) for {model} fails on a single user message: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return resolved
