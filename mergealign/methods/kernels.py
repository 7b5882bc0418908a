"""Chunked kernels shared by the task-vector methods: sparsified views, weighted sums, TIES consensus.

Every kernel walks the flattened tensors in chunks of CHUNK_ELEMENTS, so besides the output it allocates only a
few chunk-sized temporaries, whatever the tensor size. A "kept" view gives, for a slice, the sparsified (and
rescaled) chunk of one task vector; it may return a view of the input, which is therefore never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergealign.methods.base import chunk_elements

# mergekit's L1 rescale leaves a tensor unscaled when either norm is below this.
RESCALE_EPS = 1e-7


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1)


def chunk_slices(n: int, chunk: int | None = None) -> list[slice]:
    chunk = chunk or chunk_elements()
    return [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def below(x: float) -> float:
    """The largest float32 below x (x > 0): |v| > below(x) ⇔ |v| ≥ x for float32 v, so ``hardshrink`` (one fused
    op) can trim at x. Boolean masks and ``torch.where`` are several times slower on CPU."""
    t = torch.tensor(x, dtype=torch.float32)
    return float(torch.nextafter(t, torch.zeros_like(t)))


class Kept:
    """A task vector as seen by a merge: ``chunk(sl)`` is its sparsified, scaled part over a flat slice.

    Kernels visit the slices of one pass in order from the start (random masks rely on it)."""

    fresh = False  # raw() returns a view of the input (never modify it); subclasses return new tensors

    def __init__(self, tensor: Tensor, scale: float = 1.0) -> None:
        self.flat = _flat(tensor)
        self.scale = scale

    def raw(self, sl: slice) -> Tensor:
        """The kept part before ``scale``."""
        return self.flat[sl]

    def chunk(self, sl: slice) -> Tensor:
        c = self.raw(sl)
        if self.scale == 1.0:
            return c
        return c.mul_(self.scale) if self.fresh else c * self.scale

    def l1_rescale(self) -> float:
        """Set ``scale`` so the kept part has the L1 norm of the whole vector (mergekit's ``rescale``)."""
        before = after = 0.0
        for sl in chunk_slices(self.flat.numel()):
            before += float(self.flat[sl].abs().sum(dtype=torch.float64))
            after += float(self.raw(sl).abs().sum(dtype=torch.float64))
        self.scale = before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0
        return self.scale


class KeptAboveThreshold(Kept):
    """τ ⊙ 𝟙[|τ| ≥ threshold] (TIES trim); threshold ≤ 0 keeps everything."""

    fresh = True

    def __init__(self, tensor: Tensor, threshold: float, scale: float = 1.0) -> None:
        super().__init__(tensor, scale)
        self.threshold = threshold
        self._shrink = below(threshold) if threshold > 0.0 else None

    def raw(self, sl: slice) -> Tensor:
        c = self.flat[sl]
        if self._shrink is None:
            return c.clone()
        return torch.nn.functional.hardshrink(c, self._shrink)


class KeptBand(Kept):
    """τ ⊙ 𝟙[lo ≤ |τ| ≤ hi] (breadcrumbs, per tensor); ``hi < lo`` keeps nothing."""

    fresh = True

    def __init__(self, tensor: Tensor, lo: float, hi: float, scale: float = 1.0) -> None:
        super().__init__(tensor, scale)
        self.lo, self.hi = lo, hi

    def raw(self, sl: slice) -> Tensor:
        c = self.flat[sl]
        if self.hi < self.lo:
            return torch.zeros_like(c)
        # keep |τ| ≥ lo, then remove |τ| > hi (x − x = 0 exactly)
        kept = torch.nn.functional.hardshrink(c, below(self.lo)) if self.lo > 0.0 else c.clone()
        return kept.sub_(torch.nn.functional.hardshrink(c, self.hi))


class KeptMasked(Kept):
    """τ ⊙ m for a stored boolean mask m (breadcrumbs per row)."""

    fresh = True

    def __init__(self, tensor: Tensor, mask: Tensor, scale: float = 1.0) -> None:
        super().__init__(tensor, scale)
        self.mask = _flat(mask)

    def raw(self, sl: slice) -> Tensor:
        return self.flat[sl] * self.mask[sl]


def random_keep(gen: torch.Generator, n: int, density: float, device: torch.device) -> Tensor:
    """Next n draws of ``gen`` as a float 0/1 keep-mask, 1 with probability ``density`` (r < float32(density)).

    ceil(density − r) with r ∈ [0, 1) is 1 iff r < density; float ops only (exact by Sterbenz near density)."""
    r = torch.rand(n, generator=gen, device=device)
    return r.neg_().add_(density).ceil_()


class KeptRandom(Kept):
    """τ ⊙ m, m ~ Bernoulli(density) drawn from a generator made by ``make_generator`` (DARE). The draws are
    repeated exactly on every pass: the generator restarts when a pass starts at element 0."""

    fresh = True

    def __init__(
        self,
        tensor: Tensor,
        make_generator: Callable[[], torch.Generator],
        density: float,
        scale: float = 1.0,
    ) -> None:
        super().__init__(tensor, scale)
        self.make_generator = make_generator
        self.density = density
        self._gen: torch.Generator | None = None
        self._next = 0

    def raw(self, sl: slice) -> Tensor:
        if sl.start == 0:
            self._gen, self._next = self.make_generator(), 0
        if self._gen is None or sl.start != self._next:
            raise RuntimeError("random masks must be read in order from the start of the tensor")
        c = self.flat[sl]
        self._next = sl.stop
        return random_keep(self._gen, c.numel(), self.density, c.device).mul_(c)


def gta_coefficients(lam: float, weights: Sequence[float], normalize: bool) -> list[float]:
    """λ·w_t, divided by Σw when ``normalize`` (mergekit's task arithmetic; |Σw| < 1e-8 is not divided)."""
    total = sum(weights)
    div = total if normalize and abs(total) >= 1e-8 else 1.0
    return [lam * w / div for w in weights]


def weighted_sum(base: Tensor | None, kept: Sequence[Kept], coeffs: Sequence[float], like: Tensor) -> Tensor:
    """base + Σ_i coeffs[i]·kept_i (float32, shape of ``like``); the base term is skipped when None."""
    out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    out_flat = _flat(out)
    base_flat = _flat(base) if base is not None else None
    for sl in chunk_slices(out_flat.numel()):
        acc = out_flat[sl]
        if base_flat is not None:
            acc.copy_(base_flat[sl])
        else:
            acc.zero_()
        for k, c in zip(kept, coeffs, strict=True):
            if c != 0.0:
                acc.add_(k.chunk(sl), alpha=c)
    return out


@dataclass(frozen=True)
class ConsensusOptions:
    """How TIES elects signs and merges (see mergealign.methods.ties for the formulas)."""

    weights_in_election: str = "before"  # "before" (mergekit) | "after" (paper)
    merge_func: str = "mean"  # "mean" (disjoint mean) | "sum" (disjoint sum)
    zero_sign: str = "positive"  # "positive" (mergekit) | "majority" (paper reference code)
    lam: float = 1.0


def _votes(
    kept: Sequence[Kept], vote_w: Sequence[float], sl: slice
) -> tuple[list[tuple[Tensor, bool]], Tensor]:
    """Each vote e_t = v_t·chunk_t with whether it is our temporary (may be modified), and Σ_t e_t.

    The products are rounded before summing (no fused multiply-add), as mergekit does, so votes that cancel
    exactly (equal |w·τ| of opposite signs) sum to exactly 0 and the zero-sign rule applies to them."""
    votes = []
    for k, v in zip(kept, vote_w, strict=True):
        c = k.chunk(sl)
        own = k.fresh or k.scale != 1.0
        if v != 1.0:
            c = c.mul_(v) if own else c * v
            own = True
        votes.append((c, own))
    total = torch.zeros_like(votes[0][0])
    for c, _ in votes:
        total.add_(c)
    return votes, total


def ties_consensus(
    base: Tensor,
    kept: Sequence[Kept],
    weights: Sequence[float],
    opts: ConsensusOptions,
    out: Tensor | None = None,
) -> Tensor:
    """θ_0 + λ·(disjoint merge of the kept task vectors over the elected sign), chunk by chunk.

    before: e_t = w_t·τ̂_t; γ = sgn(Σ e_t); A = {t: sgn(e_t) = γ}; mean = Σ_A e_t / Σ_A w_t (0 → 1), sum = Σ_A e_t.
    after:  e_t = τ̂_t; γ = sgn(Σ e_t); A = {t: sgn(e_t) = γ}; mean = Σ_A w_t·e_t / max(|A|, 1), sum = Σ_A w_t·e_t.
    γ of an exact-zero sum: +1 ("positive") or the sign of Σγ over the tensor ("majority"; 0 → nothing agrees).
    Float ops only: with γ = ±1, e·𝟙[sgn(e) = γ] = γ·relu(γ·e) and 𝟙[sgn(e) = γ] = sgn(relu(γ·e)).
    ``out``: a contiguous float32 tensor of base's shape for the result; it may be the storage of a kept task
    vector, because each chunk of the output is written only after every input chunk at that place was read.
    """
    before = opts.weights_in_election == "before"
    vote_w = list(weights) if before else [1.0] * len(kept)
    mean = opts.merge_func == "mean"
    if out is None:
        out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    elif out.shape != base.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out: need a contiguous float32 tensor of shape {tuple(base.shape)}")
    out_flat, base_flat = _flat(out), _flat(base)
    slices = chunk_slices(out_flat.numel())

    zero_gamma = 1.0
    if opts.zero_sign == "majority":
        balance = 0.0
        for sl in slices:
            _, total = _votes(kept, vote_w, sl)
            balance += float(total.sign_().sum(dtype=torch.float64))
        zero_gamma = float((balance > 0) - (balance < 0))
    # every non-empty agreeing set has Σ_A w ≥ min w when all weights are positive, so clamping at min w only
    # replaces empty sets (whose numerator is 0); mixed signs need the exact "0 → 1" of mergekit
    positive_weights = all(w > 0 for w in weights)

    for sl in slices:
        votes, gamma = _votes(kept, vote_w, sl)
        gamma.sign_()
        if zero_gamma != 0.0:
            gamma.add_(0.5 * zero_gamma).sign_()  # maps 0 to zero_gamma, keeps ±1
        agreed = torch.zeros_like(gamma)  # Σ_A |e_t| (before) or Σ_A w_t·|e_t| (after), times γ at the end
        denom = torch.zeros_like(gamma) if mean else None
        for (e, own), w in zip(votes, weights, strict=True):
            if before and w == 0.0:
                continue  # a zero vote has sign 0 and never agrees
            part = (e.mul_(gamma) if own else e * gamma).clamp_(min=0.0)  # |e| where sgn(e) = γ, else 0
            if before:
                agreed.add_(part)
            else:
                agreed.add_(part, alpha=w)
            if denom is not None:  # sgn(part) is 1 exactly on the agreeing entries
                denom.add_(part.sign_(), alpha=w if before else 1.0)
        agreed.mul_(gamma)
        if denom is not None:
            if not before:
                denom.clamp_(min=1.0)
            elif positive_weights:
                denom.clamp_(min=min(weights))
            else:
                denom.add_(denom.abs().sign_().neg_().add_(1.0))  # exactly 1 where Σ_A w = 0
            agreed.div_(denom)
        torch.add(base_flat[sl], agreed, alpha=opts.lam, out=out_flat[sl])
    return out
