"""Plain reference formulas of the merge methods, for tests: float64, sorts and stacks, no chunking, no tricks.

Written from the papers' / mergekit's definitions (reference/merging.md §5), independently of mergealign.methods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def d(x: Tensor) -> Tensor:
    return x.detach().double()


def task_arithmetic(base, taus, weights, lam=1.0, normalize=False):
    acc = sum(w * d(t) for w, t in zip(weights, taus, strict=True))
    total = sum(weights)
    if normalize and abs(total) >= 1e-8:
        acc = acc / total
    return d(base) + lam * acc


def linear(thetas, weights, normalize=True):
    acc = sum(w * d(t) for w, t in zip(weights, thetas, strict=True))
    return acc / sum(weights) if normalize else acc


def slerp(v0, v1, t, threshold=0.9995):
    a, b = d(v0).flatten(), d(v1).flatten()
    cos = float((a @ b) / (a.norm() * b.norm()))
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > threshold:
        return (1 - t) * d(v0) + t * d(v1)
    om = math.acos(cos)
    return math.sin((1 - t) * om) / math.sin(om) * d(v0) + math.sin(t * om) / math.sin(om) * d(v1)


def kth_largest(values: Tensor, k: int) -> float:
    return float(values.flatten().abs().sort(descending=True).values[k - 1])


def trim(tau: Tensor, density: float, threshold: float | None = None) -> Tensor:
    """Keep |τ| ≥ the k-th largest |τ|, k = max(1, int(density·n)) (or ≥ a given threshold)."""
    t = d(tau)
    if threshold is None:
        if density >= 1:
            return t
        threshold = kth_largest(t, max(1, int(density * t.numel())))
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def l1_rescaled(full: Tensor, kept: Tensor) -> Tensor:
    before, after = d(full).abs().sum(), kept.abs().sum()
    return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept


def ties_merge(
    base, kept: Sequence[Tensor], weights, *, before=True, mean=True, zero_sign="positive", lam=1.0
):
    """Sign election + disjoint merge of already trimmed task vectors (TIES steps 2-4), elementwise."""
    T = torch.stack([d(k) for k in kept])
    W = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * (T.dim() - 1)))
    votes = T * W if before else T
    S = votes.sum(0)
    gamma = torch.sign(S)
    if zero_sign == "positive":
        gamma[S == 0] = 1
    else:
        gamma[S == 0] = torch.sign(torch.sign(S).sum())
    agree = (torch.sign(votes) == gamma) & (votes != 0)
    num = (T * W * agree).sum(0)
    if mean:
        if before:
            den = (W * agree).sum(0)
            den[den == 0] = 1
        else:
            den = agree.sum(0).double().clamp(min=1)
        num = num / den
    return d(base) + lam * num


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float, per_row: bool = False) -> Tensor:
    """mergekit's index rule: ascending |τ| ranks n_bot … n_bot+kept−1 survive (per row along the last dim)."""
    t = d(tau)
    rows = t.reshape(-1, t.shape[-1]) if per_row else t.reshape(1, -1)
    mask = torch.zeros_like(rows, dtype=torch.bool)
    for r in range(rows.shape[0]):
        n = rows.shape[1]
        kept, n_top = int(density * n), int(gamma * n)
        n_bot = max(0, n - kept - n_top)
        order = rows[r].abs().argsort(stable=True)
        mask[r, order[n_bot : n_bot + kept]] = True
    return mask.reshape(t.shape)
