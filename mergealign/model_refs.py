"""What a model string names: a local directory, or a hub repo id with an optional revision; and pinning a
hub revision (branch, tag or sha) to its commit sha without downloading weights."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mergealign.errors import HubUnreachableError, MergeAlignError

log = logging.getLogger(__name__)

_REVISION_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelRef:
    """A model as the user named it: a local directory, or a hub repo id with an optional revision."""

    spec: str
    local_path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return self.local_path is not None


def parse_model_ref(spec: str, *, base_dir: Path | None = None) -> ModelRef:
    """'org/name@rev' or 'org/name' -> hub ref; an existing path (absolute, ./relative) -> local.

    A string that looks like both (`org/name` that also exists as a local dir) is local: what is on disk wins,
    so nothing is fetched that the user already has.
    """
    candidate = Path(spec).expanduser()
    if not candidate.is_absolute() and base_dir is not None:
        candidate = base_dir / candidate
    if candidate.exists():
        return ModelRef(spec=spec, local_path=candidate.resolve())
    repo, _, rev = spec.partition("@")
    if spec.startswith(("/", "./", "../", "~")) or not _REVISION_RE.match(repo):
        raise MergeAlignError(
            f"model {spec!r}: no such local directory, and not a hub id of the form org/name[@revision]"
        )
    return ModelRef(spec=spec, repo_id=repo, revision=rev or None)


@dataclass(frozen=True)
class ResolvedRef:
    """A hub reference pinned to a commit sha."""

    repo_id: str
    revision: str | None
    sha: str


def resolve_revision(ref: ModelRef, *, token: str | None = None) -> ResolvedRef:
    """Resolve a hub ref's revision (branch, tag or sha) to its commit sha, without downloading weights.

    Offline (HF_HUB_OFFLINE=1) the local HF cache answers; otherwise the hub API. Errors say what to do.
    """
    if ref.repo_id is None:
        raise MergeAlignError(f"model {ref.spec!r} is a local directory; only hub ids have revisions")
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = ref.revision or "main"
    if constants.HF_HUB_OFFLINE:
        sha = _cached_sha(ref.repo_id, revision)
        if sha is None:
            raise MergeAlignError(
                f"model {ref.spec!r}: offline (HF_HUB_OFFLINE=1) and not in the local HF cache "
                f"({constants.HF_HUB_CACHE}). Download it on a connected machine, or name a local directory."
            )
        return ResolvedRef(ref.repo_id, ref.revision, sha)
    token = token or os.environ.get("HF_TOKEN")
    try:
        info = HfApi().model_info(ref.repo_id, revision=revision, token=token)
    except RevisionNotFoundError:
        raise MergeAlignError(f"model {ref.spec!r}: revision {revision!r} does not exist") from None
    except GatedRepoError:
        raise MergeAlignError(
            f"model {ref.spec!r}: gated repository; accept its licence on the hub and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise MergeAlignError(
            f"model {ref.spec!r}: repository not found (or private: set HF_TOKEN)"
        ) from None
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as exc:
        sha = _cached_sha(ref.repo_id, revision)
        if sha is not None:
            log.warning(
                "hub unreachable (%s); using cached revision %s of %s", type(exc).__name__, sha, ref.repo_id
            )
            return ResolvedRef(ref.repo_id, ref.revision, sha)
        raise HubUnreachableError(
            f"model {ref.spec!r}: cannot reach the hub and no local copy is cached ({type(exc).__name__}). "
            "To run offline, name a local directory, or fill the HF cache and set HF_HUB_OFFLINE=1."
        ) from None
    return ResolvedRef(ref.repo_id, ref.revision, info.sha)


def _cached_sha(repo_id: str, revision: str) -> str | None:
    from huggingface_hub import constants

    if re.fullmatch(r"[0-9a-f]{40}", revision):
        snap = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision
        return revision if snap.is_dir() else None
    ref_file = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    return ref_file.read_text().strip() if ref_file.exists() else None
