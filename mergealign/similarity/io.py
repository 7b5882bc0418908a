"""Files of a similarity pass: similarity.json, tensors.parquet, merged.parquet (all written atomically)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergealign.errors import MergeAlignError
from mergealign.files import atomic_write_bytes, atomic_write_text, json_safe

if TYPE_CHECKING:
    from mergealign.similarity.result import SimilarityResult


def write_result(result: SimilarityResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write similarity.json, tensors.parquet and merged.parquet (if any merged model) atomically."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"tensors": out / "tensors.parquet"}
    atomic_write_bytes(paths["tensors"], _parquet(pd.DataFrame(result.tensor_rows())))
    if result.merged_labels:
        paths["merged"] = out / "merged.parquet"
        atomic_write_bytes(paths["merged"], _parquet(pd.DataFrame(result.merged_rows())))
    paths["json"] = out / "similarity.json"
    atomic_write_text(paths["json"], json.dumps(json_safe(result.summary()), indent=1, allow_nan=False))
    return paths


def _parquet(frame: Any) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def load_similarity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read similarity.json (a file, or the directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "similarity.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise MergeAlignError(f"{p}: similarity results not found") from None
    except json.JSONDecodeError as exc:
        raise MergeAlignError(f"{p}: not valid JSON ({exc})") from None
