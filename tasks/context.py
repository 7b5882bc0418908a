"""The step context: where a study's steps read and write, and how they check reused work."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from mergealign.artifacts import ArtifactStore, VerifyLevel
from mergealign.files import sha256_bytes
from mergealign.study.config import RunConfig


class StepContext(BaseModel):
    """Where a step reads and writes, and how it checks reused work. Small and serialisable."""

    model_config = ConfigDict(frozen=True)

    study: str
    artifact_root: str
    results_dir: str
    locks_dir: str
    verify: VerifyLevel = "full"
    device: str = "auto"
    hf_cache_dir: str | None = None
    hf_token_secret: str | None = None
    gpu_slot: str | None = "gpu"

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.artifact_root)


def context_for(cfg: RunConfig) -> StepContext:
    """The step context of a run config. Prefect records and locks live under the artifact root when it is
    local (`<root>/.prefect/`), else under `execution.results_dir` or a local cache folder."""
    root = cfg.artifact_root
    store = ArtifactStore(root)
    if cfg.execution.results_dir:
        prefect_dir = Path(cfg.execution.results_dir)
    elif store.is_local:
        prefect_dir = Path(store.root) / ".prefect"
    else:
        cache = Path(os.environ.get("MERGEALIGN_CACHE", Path.home() / ".cache" / "mergealign"))
        prefect_dir = cache / "prefect" / sha256_bytes(root.encode())[:16]
    return StepContext(
        study=cfg.name,
        artifact_root=store.root if store.is_local else root,
        results_dir=str(prefect_dir / "results"),
        locks_dir=str(prefect_dir / "locks"),
        verify=cfg.execution.verify,
        device=cfg.execution.device,
        hf_cache_dir=cfg.execution.hf_cache_dir,
        hf_token_secret=cfg.execution.hf_token_secret,
        gpu_slot=cfg.execution.gpu_slot,
    )
