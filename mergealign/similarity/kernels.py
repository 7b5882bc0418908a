"""Fused numba kernel of the similarity pass (imported lazily by mergealign.similarity.sums).

One call walks a tensor once, row by row: each row (or piece of a long row) of every input is decoded into
float32 scratch buffers (bfloat16 by a 16-bit shift, so the inputs are never converted as whole tensors), then
small loops over the scratch buffers accumulate the sums into running float64 / int64 accumulators. Every input
dtype runs the same loops on the same float32 values, and the accumulation order depends only on the row
length, so the standalone pass (bfloat16 read from disk, whole tensors) and the fused pass (float32 row blocks
from the merge engine) give bit-identical sums. Compiled on first use and cached on disk next to this file.

Accumulators: acc = [bb, bd, ba, dd, da, aa, top_energy_d, top_energy_a]; cnt = [both_nonzero, conflicts,
top_d, top_a, top_both, top_both_conflicts]; macc = [mb, md, ma, mm] per merged model.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

# Longest piece of a row decoded at once: four float32 scratch buffers of this size stay in L2.
MAX_PIECE = 16384
# Reassociation lets LLVM vectorise the reductions; no nnan/ninf, so NaN and Inf propagate as in IEEE math.
_FAST = {"reassoc", "contract"}


@intrinsic
def _bits_to_f32(typingctx, x):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def _decode(src, start, m, dst):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_decode, inline="always")
def _decode_impl(src, start, m, dst):
    if src.dtype == types.uint16:  # bfloat16 bits: the top half of a float32

        def impl_bf16(src, start, m, dst):
            for i in range(m):
                dst[i] = _bits_to_f32(np.uint32(src[start + i]) << np.uint32(16))

        return impl_bf16

    def impl_float(src, start, m, dst):
        for i in range(m):
            dst[i] = np.float32(src[start + i])

    return impl_float


@njit(fastmath=_FAST, cache=True, nogil=True)
def _block_gram(sb, se, sa, m, thr_d, thr_a, acc):
    bb = 0.0
    bd = 0.0
    ba = 0.0
    dd = 0.0
    da = 0.0
    aa = 0.0
    ed = 0.0
    ea = 0.0
    for i in range(m):
        b = sb[i]
        d = se[i] - b
        a = sa[i] - b
        b64 = np.float64(b)
        d64 = np.float64(d)
        a64 = np.float64(a)
        bb += b64 * b64
        bd += b64 * d64
        ba += b64 * a64
        dd += d64 * d64
        da += d64 * a64
        aa += a64 * a64
        ed += d64 * d64 if abs(d) >= thr_d else 0.0
        ea += a64 * a64 if abs(a) >= thr_a else 0.0
    acc[0] += bb
    acc[1] += bd
    acc[2] += ba
    acc[3] += dd
    acc[4] += da
    acc[5] += aa
    acc[6] += ed
    acc[7] += ea


@njit(fastmath=_FAST, cache=True, nogil=True)
def _block_counts(sb, se, sa, m, thr_d, thr_a, cnt):
    nz = np.int32(0)
    cf = np.int32(0)
    td = np.int32(0)
    ta = np.int32(0)
    tb = np.int32(0)
    tbc = np.int32(0)
    for i in range(m):
        b = sb[i]
        d = se[i] - b
        a = sa[i] - b
        both = np.int32((d != 0) & (a != 0))
        conf = both & np.int32((d < 0) != (a < 0))
        nz += both
        cf += conf
        ind = np.int32(abs(d) >= thr_d)
        ina = np.int32(abs(a) >= thr_a)
        td += ind
        ta += ina
        ov = ind & ina
        tb += ov
        tbc += ov & conf
    cnt[0] += nz
    cnt[1] += cf
    cnt[2] += td
    cnt[3] += ta
    cnt[4] += tb
    cnt[5] += tbc


@njit(fastmath=_FAST, cache=True, nogil=True)
def _block_merged(sb, se, sa, sm, m, acc):
    mb = 0.0
    md = 0.0
    ma = 0.0
    mm = 0.0
    for i in range(m):
        b = sb[i]
        d64 = np.float64(se[i] - b)
        a64 = np.float64(sa[i] - b)
        x64 = np.float64(sm[i] - b)
        mb += x64 * np.float64(b)
        md += x64 * d64
        ma += x64 * a64
        mm += x64 * x64
    acc[0] += mb
    acc[1] += md
    acc[2] += ma
    acc[3] += mm


@njit(cache=True, nogil=True)
def tensor_sums(b, e, a, merged, n_merged, row_len, thr_d, thr_a, acc, cnt, macc):
    """Add the sums of flattened rows to ``acc`` (8 float64), ``cnt`` (6 int64) and ``macc`` (4 per merged model).

    Rows of ``row_len`` elements are summed one at a time (in pieces of at most MAX_PIECE), and the running
    sums are passed in and out, so a tensor given whole or in consecutive row blocks gets bit-identical sums.
    ``merged`` is a tuple of arrays of one type, of which the first ``n_merged`` are used (``(b,)`` and 0 when
    there is none).
    """
    n = b.size
    piece = min(max(row_len, 1), MAX_PIECE)
    sb = np.empty(piece, np.float32)
    se = np.empty(piece, np.float32)
    sa = np.empty(piece, np.float32)
    sm = np.empty(piece, np.float32)
    t_d = np.float32(thr_d)
    t_a = np.float32(thr_a)
    row_start = 0
    while row_start < n:
        row_stop = min(row_start + max(row_len, 1), n)
        start = row_start
        while start < row_stop:
            m = min(piece, row_stop - start)
            _decode(b, start, m, sb)
            _decode(e, start, m, se)
            _decode(a, start, m, sa)
            _block_gram(sb, se, sa, m, t_d, t_a, acc)
            _block_counts(sb, se, sa, m, t_d, t_a, cnt)
            for j in range(n_merged):
                _decode(merged[j], start, m, sm)
                _block_merged(sb, se, sa, sm, m, macc[4 * j : 4 * j + 4])
            start += m
        row_start = row_stop
