"""Hugging Face hub access for the pipeline: pin a revision, fetch metadata first, then the weights.

- `resolve` pins a hub id + revision to a commit sha (mergealign.model_refs.resolve_revision).
- `fetch_metadata` downloads only config.json, the safetensors index, generation config and tokenizer
  files, and `remote_tensor_infos` reads the safetensors headers through the hub API (HTTP range requests),
  so a preflight can reject models that do not fit together before any weights are downloaded.
- `download` fetches a pinned snapshot with `ALLOW_PATTERNS` (safetensors, config, tokenizer, chat template,
  generation config; never pickle weights).

The token comes from the caller (the Prefect task reads HF_TOKEN or a Secret block) and is only ever handed
to huggingface_hub: never logged, never written. `is_transient` tells retryable failures (network, HTTP 5xx,
429, timeouts) from permanent ones (401/403/404, missing revision, bad input, out of memory).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mergealign.checkpoint import (
    GENERATION_CONFIG,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    Checkpoint,
    TensorInfo,
)
from mergealign.errors import HubUnreachableError, MergeAlignError
from mergealign.model_refs import ModelRef, ResolvedRef, parse_model_ref, resolve_revision

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ["*.safetensors", SAFETENSORS_INDEX]
# config, index, generation config and the files that travel with a model (checkpoint.TOKENIZER_FILES)
METADATA_PATTERNS = ["config.json", GENERATION_CONFIG, SAFETENSORS_INDEX, *TOKENIZER_FILES]
ALLOW_PATTERNS = sorted({*WEIGHT_PATTERNS, *METADATA_PATTERNS})
OFFLINE_HELP = (
    "To run offline, point the model at a local directory (`path:` in the run config), or fill the HF cache "
    "on a connected machine (`hf download ORG/NAME --revision REV`) and run with HF_HUB_OFFLINE=1."
)

_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_TRANSIENT_NAMES = {
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "WriteTimeout",
    "PoolTimeout",
    "TimeoutException",
    "Timeout",
    "TimeoutError",
    "TransportError",
    "RemoteProtocolError",
    "ReadError",
    "RemoteDisconnected",
    "ProtocolError",
    "IncompleteRead",
    "ChunkedEncodingError",
    "ConnectionResetError",
    "BrokenPipeError",
}


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: network errors, timeouts, HTTP 429/5xx. False for everything a retry
    cannot fix: user errors (MergeAlignError), 401/403/404, missing repos or revisions, validation, OOM."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, HubUnreachable):
            return True
        if isinstance(current, MergeAlignError | MemoryError | ValueError | TypeError | KeyError):
            return False
        names = {cls.__name__ for cls in type(current).__mro__}
        if "OutOfMemoryError" in names or "ValidationError" in names:
            return False
        status = http_status(current)
        if status is not None:
            return status in _TRANSIENT_STATUS
        if names & _TRANSIENT_NAMES:
            return True
        current = current.__cause__ or current.__context__
    return False


# The hub could not be reached and no local copy helps: retryable (raised by model_refs.resolve_revision too).
HubUnreachable = HubUnreachableError


# --------------------------------------------------------------------------- token
def token_from_env() -> str | None:
    """HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) from the environment; None if unset."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


# --------------------------------------------------------------------------- resolve
def resolve(spec: str, *, token: str | None = None) -> ResolvedRef:
    """'org/name[@revision]' -> the commit sha (offline: from the HF cache). Errors say what to do."""
    ref = parse_model_ref(spec)
    if ref.repo_id is None:
        raise MergeAlignError(f"model {spec!r} is a local directory, not a hub id")
    return resolve_revision(ref, token=token)


def _hub_call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call huggingface_hub, turning its errors into clear ones (keeping transient ones retryable)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return fn(*args, **kwargs)
    except LocalEntryNotFoundError:
        raise MergeAlignError(
            f"{what}: not in the local HF cache and the hub is not reachable. {OFFLINE_HELP}"
        ) from None
    except GatedRepoError:
        raise MergeAlignError(
            f"{what}: gated repository; accept its licence on the hub and set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise MergeAlignError(f"{what}: revision does not exist") from None
    except RepositoryNotFoundError:
        raise MergeAlignError(f"{what}: repository not found (or private: set HF_TOKEN)") from None
    except EntryNotFoundError as exc:
        raise MergeAlignError(f"{what}: file not found on the hub ({exc})") from None
    except Exception as exc:
        status = http_status(exc)
        if status in (401, 403):
            raise MergeAlignError(f"{what}: access denied (HTTP {status}); check HF_TOKEN") from None
        if is_transient(exc):
            raise HubUnreachable(
                f"{what}: hub unreachable ({type(exc).__name__}: {exc}). {OFFLINE_HELP}"
            ) from exc
        raise


# --------------------------------------------------------------------------- download
def fetch_metadata(
    ref: ResolvedRef, *, token: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """config.json, the safetensors index, generation config and tokenizer files of a pinned snapshot."""
    from huggingface_hub import snapshot_download

    path = _hub_call(
        f"{ref.repo_id}@{ref.sha[:12]} (metadata)",
        snapshot_download,
        ref.repo_id,
        revision=ref.sha,
        allow_patterns=METADATA_PATTERNS,
        cache_dir=cache_dir,
        token=token,
    )
    snap = Path(path)
    if not (snap / "config.json").is_file():
        raise MergeAlignError(f"{ref.repo_id}@{ref.sha[:12]}: has no config.json; not a transformers model")
    return snap


def remote_tensor_infos(ref: ResolvedRef, *, token: str | None = None) -> dict[str, TensorInfo]:
    """Every tensor's name, shape and dtype from the safetensors headers on the hub (range requests; no weights).

    Offline, the headers of a fully cached snapshot are read from disk instead.
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        from huggingface_hub import snapshot_download

        snap = _hub_call(
            f"{ref.repo_id}@{ref.sha[:12]}", snapshot_download, ref.repo_id, revision=ref.sha,
            allow_patterns=WEIGHT_PATTERNS, local_files_only=True,
        )  # fmt: skip
        from mergealign.checkpoint import Checkpoint

        return dict(Checkpoint(snap).tensors)
    meta = _hub_call(f"{ref.repo_id}@{ref.sha[:12]} (safetensors headers)", HfApi().get_safetensors_metadata,
                     ref.repo_id, revision=ref.sha, token=token)  # fmt: skip
    out: dict[str, TensorInfo] = {}
    for fname, fmeta in meta.files_metadata.items():
        for name, t in fmeta.tensors.items():
            out[name] = TensorInfo(name=name, shape=tuple(t.shape), dtype=t.dtype, file=fname)
    return out


class HeaderCheckpoint(Checkpoint):
    """A hub checkpoint known from its config.json and safetensors headers only (no weights on disk).

    Enough for the engine's preflight (names, shapes, dtypes, architecture, vocabulary); reading a tensor is
    an error.
    """

    def __init__(self, path: Path, config: dict[str, Any], tensors: dict[str, TensorInfo], *, label: str):
        # Checkpoint.__init__ scans weight files, which are not here: set what the header-level API reads.
        self.path = Path(path)
        self.label = label
        self.config = config
        self.format = "safetensors"
        self.tensors = tensors
        if not self.tensors:
            raise MergeAlignError(f"{label}: the hub lists no safetensors tensors for it")

    def close(self) -> None:
        return None

    def get(self, name: str) -> Any:
        raise MergeAlignError(f"{self.label}: weights not downloaded yet (header-only checkpoint)")

    @property
    def weight_files(self) -> list[Path]:
        return []


def header_checkpoint(
    ref: ResolvedRef,
    *,
    token: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    label: str = "",
) -> Checkpoint:
    """A checkpoint for preflight from metadata only: config.json (downloaded) + tensor headers (hub API).

    When the full snapshot is already in the HF cache it is opened as a normal checkpoint.
    """
    import json

    from huggingface_hub import snapshot_download

    try:
        snap = Path(snapshot_download(ref.repo_id, revision=ref.sha, allow_patterns=ALLOW_PATTERNS,
                                      cache_dir=cache_dir, local_files_only=True))  # fmt: skip
        if any(snap.glob("*.safetensors")):
            return Checkpoint(snap, label=label or ref.repo_id)
    except Exception:  # not (fully) cached: go to the hub for metadata only
        pass
    meta_dir = fetch_metadata(ref, token=token, cache_dir=cache_dir)
    config = json.loads((meta_dir / "config.json").read_text())
    tensors = remote_tensor_infos(ref, token=token)
    return HeaderCheckpoint(meta_dir, config, tensors, label=label or ref.repo_id)


def download(
    ref: ResolvedRef,
    *,
    token: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Download (or find in the HF cache) a pinned snapshot: safetensors weights, config, tokenizer, chat
    template and generation config. Returns the snapshot directory."""
    from huggingface_hub import snapshot_download

    path = _hub_call(
        f"{ref.repo_id}@{ref.sha[:12]}",
        snapshot_download,
        ref.repo_id,
        revision=ref.sha,
        allow_patterns=allow_patterns or ALLOW_PATTERNS,
        cache_dir=cache_dir,
        token=token,
    )
    snap = Path(path)
    if not any(snap.glob("*.safetensors")):
        raise MergeAlignError(
            f"{ref.repo_id}@{ref.sha[:12]}: no *.safetensors weights in the snapshot (pickle weights are not "
            "downloaded: convert them to safetensors)"
        )
    return snap


def snapshot_files(snapshot: Path) -> list[str]:
    """Relative paths of the files of a snapshot directory (symlinks into the blob store included)."""
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


__all__ = [
    "ALLOW_PATTERNS",
    "METADATA_PATTERNS",
    "HubUnreachable",
    "ModelRef",
    "ResolvedRef",
    "download",
    "fetch_metadata",
    "header_checkpoint",
    "is_transient",
    "remote_tensor_infos",
    "resolve",
    "snapshot_files",
    "token_from_env",
]
