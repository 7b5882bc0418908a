"""The figures of the similarity analysis, derived from summed inner products and counts (any level)."""

from __future__ import annotations

import math
from collections.abc import Mapping


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _cos(dot: float, sq1: float, sq2: float) -> float | None:
    den = math.sqrt(sq1) * math.sqrt(sq2)
    return max(-1.0, min(1.0, dot / den)) if den > 0 else None


def pair_metrics(s: Mapping[str, float]) -> dict[str, float | None]:
    """Figures of τ_D vs τ_A from summed PAIR_SUMS (any level)."""
    n = s["numel"]
    ee = s["bb"] + 2 * s["bd"] + s["dd"]
    aa_full = s["bb"] + 2 * s["ba"] + s["aa"]
    ea = s["bb"] + s["bd"] + s["ba"] + s["da"]
    union = s["top_d"] + s["top_a"] - s["top_both"]
    return {
        "norm_d": math.sqrt(s["dd"]),
        "norm_a": math.sqrt(s["aa"]),
        "norm_base": math.sqrt(s["bb"]),
        "rel_norm_d": _ratio(math.sqrt(s["dd"]), math.sqrt(s["bb"])),
        "rel_norm_a": _ratio(math.sqrt(s["aa"]), math.sqrt(s["bb"])),
        "cos_da": _cos(s["da"], s["dd"], s["aa"]),
        "sign_conflict": _ratio(s["conflicts"], s["both_nonzero"]),
        "both_nonzero": _ratio(s["both_nonzero"], n),
        "ties_energy_d": _ratio(s["top_energy_d"], s["dd"]),
        "ties_energy_a": _ratio(s["top_energy_a"], s["aa"]),
        "ties_overlap": _ratio(s["top_both"], n),
        "ties_jaccard": _ratio(s["top_both"], union),
        "ties_conflict": _ratio(s["top_both_conflicts"], s["top_both"]),
        "cos_expert_aligned": _cos(ea, ee, aa_full),
    }


def merged_metrics(s: Mapping[str, float], m: Mapping[str, float]) -> dict[str, float | None]:
    """Figures of one merged model's delta δ against τ_D and τ_A from summed sums (any level)."""
    dd, da, aa = s["dd"], s["da"], s["aa"]
    md, ma, mm = m["md"], m["ma"], m["mm"]
    coef_d, coef_a = _least_squares(dd, da, aa, md, ma)
    share_d = _ratio(coef_d * md, mm) if coef_d is not None else None
    share_a = _ratio(coef_a * ma, mm) if coef_a is not None else None
    bb, bd, ba, mb = s["bb"], s["bd"], s["ba"], m["mb"]
    theta_m = bb + 2 * mb + mm
    return {
        "norm_delta": math.sqrt(mm),
        "cos_d": _cos(md, mm, dd),
        "cos_a": _cos(ma, mm, aa),
        "coef_d": coef_d,
        "coef_a": coef_a,
        "share_d": share_d,
        "share_a": share_a,
        "share_residual": (1.0 - share_d - share_a) if share_d is not None and share_a is not None else None,
        "cos_expert": _cos(bb + bd + mb + md, theta_m, bb + 2 * bd + dd),
        "cos_aligned": _cos(bb + ba + mb + ma, theta_m, bb + 2 * ba + aa),
    }


def _least_squares(
    dd: float, da: float, aa: float, md: float, ma: float
) -> tuple[float | None, float | None]:
    """argmin_c ‖δ − c_D τ_D − c_A τ_A‖ from the normal equations; the minimum-norm solution when τ_D ∥ τ_A."""
    det = dd * aa - da * da
    scale = dd * aa
    if scale <= 0:
        if dd > 0:
            return md / dd, 0.0
        if aa > 0:
            return 0.0, ma / aa
        return None, None
    if det > 1e-12 * scale:
        return (md * aa - ma * da) / det, (ma * dd - md * da) / det
    # Collinear: minimum-norm solution along τ_D + τ_A direction (pseudo-inverse of the 2×2 Gram).
    import numpy as np

    sol = np.linalg.lstsq(np.array([[dd, da], [da, aa]]), np.array([md, ma]), rcond=1e-12)[0]
    return float(sol[0]), float(sol[1])
