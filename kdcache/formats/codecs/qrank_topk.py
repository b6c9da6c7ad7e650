"""qrank's top-k encoder, spread over blocks of one window (qrank.py describes the blob).

The blob is the same, byte for byte, whatever the blocks or threads: every step but the stream
assembly is row-local, and each is the same arithmetic, in the same order, as a one-block
encoder's. A window's rows are cut into blocks (even starts: a dq byte holds two rows) and, on
the codec's BlockPool:

1. per row block (numpy): the row's top on the 1/64-nat grid, log-probs relative to it and
   exp(rel / 2), the row's log-probs normalised over its k entries and their exp;
2. rate control: each row's renormalised KL for a candidate step (`row_kl`, no transcendental
   per entry: exp of a decoded level is a table lookup), summed over rows in row order;
3. per row block: codes, the top lowered where the decoded mass would exceed 1, ranks, each
   row's (code, rank) order, and per entry its dq nibble, first/gap symbol and extra bits,
   written column-major at the block's rows (`sort_and_symbolize`);
4. per column block: the first/gap symbol streams, dq escapes and extra bits at their offsets
   (`split_columns`); then the streams go through zstd, one per thread.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numba
import numpy as np

from kdcache.formats.codecs import qrank_kernels as kern
from kdcache.formats.codecs.blocks import BlockPool, split
from kdcache.formats.codecs.quantize import MAX_CODE, LogProbQuantizer

if TYPE_CHECKING:
    from kdcache.formats.codecs.qrank import QRankCodec

ESCAPE = 15  # a dq nibble of 15 means 15 + the next value of the escape stream
SQRT_UNIT = 1e-4  # the blob header stores sqrt_step in these units (u16)
SQRT_LADDER = (100, 125, 150, 175, 200, 225, 250, 275, 300, 350, 400, 500)
# Sizes in entries (rows x k): a block smaller than MIN_BLOCK costs more in per-call overhead
# (and GIL hand-offs, which the engine's thread needs too) than it gains; numpy steps run on
# CHUNK entries at a time so that their float64 temporaries stay in cache.
MIN_BLOCK = 1 << 17
CHUNK = 1 << 15


def _rows_of(entries: int, k: int, least: int) -> int:
    return max(least, entries // max(1, k))


def exp_shifted_levels(levels: np.ndarray) -> np.ndarray:
    """float64 exp(levels[c] - levels[0]): the rate control's exp(q - max q) of a row whose top
    entry has code 0, by lookup (what `row_kl` would compute per entry). Needs a table that
    never rises with the code (max q is then levels[0]); every quantiser's does."""
    if not bool(np.all(np.diff(levels) <= 0)):
        raise ValueError("qrank: the quantiser's decode table rises with the code somewhere")
    return _exp_shifted(levels)


@numba.njit(cache=True, nogil=True)
def _exp_shifted(levels):
    out = np.empty(levels.shape[0], dtype=np.float64)
    top = np.float64(levels[0])
    for c in range(levels.shape[0]):
        out[c] = np.exp(np.float64(levels[c]) - top)
    return out


@numba.njit(cache=True, nogil=True)
def row_kl(p, weights, rel, half_exp, y_top, threshold, sqrt_step, step_max, levels, exp_shifted,
           out):
    """out[r] = KL(p_r || q_r), q_r row r quantised (the encoder's codes, the decoder's levels)
    and renormalised. p: normalised log-probs (float64 [m, k]), weights = exp(p), rel = log-probs
    relative to the row's top (<= 0), half_exp = exp(rel / 2); column 0 is the row's top entry
    (code 0). Levels fall with the code (exp_shifted_levels checks), so max q = levels[0] and
    exp(q - max q) is a lookup in `exp_shifted`: no transcendental per entry."""
    m, k = p.shape
    e_half_t = np.exp(threshold / 2.0)
    max_code = np.float64(levels.shape[0] - 1)
    mx = np.float64(levels[0])
    q = np.empty(k, dtype=np.float64)
    e = np.empty(k, dtype=np.float64)
    for r in range(m):
        q[0] = mx
        e[0] = exp_shifted[0]
        for j in range(1, k):  # both pieces computed and one selected: no branch, SIMD
            lp = rel[r, j]
            upper = 2.0 * (half_exp[r, j] - e_half_t) / sqrt_step
            lower = (lp - threshold) / step_max
            c = np.rint(y_top - (upper if lp >= threshold else lower))
            code = np.int64(min(max(c, 0.0), max_code))
            q[j] = np.float64(levels[code])
            e[j] = exp_shifted[code]
        s = 0.0
        for j in range(k):
            s += e[j]
        lse = mx + np.log(s)
        row = 0.0
        for j in range(k):
            row += weights[r, j] * (p[r, j] - (q[j] - lse))
        out[r] = row


@numba.njit(cache=True, nogil=True)
def mean_in_order(x):
    """Sum of x in index order, over its length (the rate control's mean KL)."""
    total = 0.0
    for i in range(x.shape[0]):
        total += x[i]
    return total / x.shape[0]


@numba.njit(cache=True, nogil=True)
def quantize_rows(rel, half_exp, argmax, y_top, threshold, e_half_t, sqrt_step, step_max,
                  codes):
    """LogProbQuantizer.encode of each entry (same operations), the row's top entry code 0."""
    m, k = rel.shape
    for r in range(m):
        for j in range(k):
            lp = rel[r, j]
            if lp >= threshold:
                y = 2.0 * (half_exp[r, j] - e_half_t) / sqrt_step
            else:
                y = (lp - threshold) / step_max
            c = np.rint(y_top - y)
            codes[r, j] = 0 if c < 0 else (MAX_CODE if c > MAX_CODE else np.int64(c))
        codes[r, argmax[r]] = 0


@numba.njit(inline="always")
def _symbol(x):
    """qrank_kernels.symbolize of one value: (symbol, extra-bit count, extra bits)."""
    v = x + 1
    e = np.int64(0)
    t = v
    for shift in (32, 16, 8, 4, 2, 1):  # floor(log2 v), branch-free (ranks are random)
        s = np.int64(t >= (np.int64(1) << shift)) * shift
        t >>= s
        e += s
    nb = max(e - 2, np.int64(0))
    small = np.int64(e < 2)  # v in 1..3: symbol v - 1, no extra bits (selected, not branched)
    sym = small * (v - 1) + (1 - small) * (3 + 4 * nb + ((v >> nb) & 3))
    return sym, nb, v & ((np.int64(1) << nb) - 1)


@numba.njit(inline="always")
def _sorted_keys(codes, ranks, keys):
    """keys = sorted (code << 31 | rank) of one row. Keys are distinct in a row (distinct ids),
    so any sort gives the one order. Codes of a validated row already rise (log-probs fall), so
    only the entries of each tie group (equal codes, a few each) are out of order: insertion
    sort, while it stays cheap (long tie groups would make it quadratic)."""
    k = codes.shape[0]
    for j in range(k):
        keys[j] = (codes[j] << 31) | ranks[j]
    budget = 8 * k  # moves; past it the row is not near-sorted and a full sort is cheaper
    for j in range(1, k):
        x = keys[j]
        i = j - 1
        while i >= 0 and keys[i] > x:
            keys[i + 1] = keys[i]
            i -= 1
        keys[i + 1] = x
        budget -= j - 1 - i
        if budget < 0:
            keys.sort()
            return


TILE = 64  # rows symbolised together before their columns are written out (a blocked transpose)


@numba.njit(cache=True, nogil=True)
def sort_and_symbolize(codes, ranks, r0, dq, nibbles, first, syms, nbits, extra, n_first,
                       n_bits, n_esc):
    """Rows r0.. of a window (codes, ranks: this block's [mb, k]; r0 even): each row sorted by
    (code, rank), then per entry, column-major at the row's column: dq (code step, entries
    1..k-1), its nibble (two rows per byte, even row high), first (entry starts a tie group),
    the symbol of its rank (first) or rank gap (otherwise) with its extra bits. n_first /
    n_bits / n_esc [k]: this block's count of first entries, extra bits and escaped dq per
    column. Rows go through a tile of TILE rows held column-major, so the window's arrays are
    written a contiguous run per column, not one scattered entry at a time."""
    mb, k = codes.shape
    keys = np.empty(k, dtype=np.int64)
    t_dq = np.zeros((k, TILE), dtype=np.uint16)
    t_first = np.empty((k, TILE), dtype=np.bool_)
    t_syms = np.empty((k, TILE), dtype=np.uint8)
    t_nbits = np.empty((k, TILE), dtype=np.uint8)
    t_extra = np.empty((k, TILE), dtype=np.uint32)
    for t0 in range(0, mb, TILE):
        n = min(TILE, mb - t0)
        for i in range(n):
            _sorted_keys(codes[t0 + i], ranks[t0 + i], keys)
            prev_code = np.int64(0)
            prev_rank = np.int64(0)
            for j in range(k):
                code = keys[j] >> 31
                rank = keys[j] & 0x7FFFFFFF
                if j == 0:
                    is_first = True
                    x = rank
                else:
                    d = code - prev_code
                    t_dq[j, i] = d  # codes are uint16, so are their steps
                    n_esc[j] += d >= ESCAPE
                    is_first = d > 0
                    x = rank - np.int64(not is_first) * (prev_rank + 1)  # rank, or gap in a tie
                s, nb, bits = _symbol(x)
                t_first[j, i] = is_first
                t_syms[j, i] = s
                t_nbits[j, i] = nb
                t_extra[j, i] = bits
                n_first[j] += is_first
                n_bits[j] += nb
                prev_code = code
                prev_rank = rank
        r = r0 + t0
        for j in range(k):
            first[j, r:r + n] = t_first[j, :n]
            syms[j, r:r + n] = t_syms[j, :n]
            nbits[j, r:r + n] = t_nbits[j, :n]
            extra[j, r:r + n] = t_extra[j, :n]
            if j:
                for i in range(n):
                    dq[j - 1, r + i] = t_dq[j, i]
                for i in range(0, n, 2):
                    hi = min(t_dq[j, i], ESCAPE)
                    lo = min(t_dq[j, i + 1], ESCAPE) if i + 1 < n else 0
                    nibbles[j - 1, (r + i) >> 1] = np.uint8((hi << 4) | lo)


@numba.njit(cache=True, nogil=True)
def split_columns(c0, c1, first, syms, nbits, extra, dq, fsyms, f_pos, gsyms, g_pos, escapes,
                  e_pos, words, phase):
    """Columns c0..c1-1 in stream order: symbols of first entries to fsyms from f_pos, the
    others to gsyms from g_pos, dq escapes (dq - 15) to escapes from e_pos, extra bits packed
    LSB-first into `words` (this range's own, the first bit at `phase` < 64)."""
    m = first.shape[1]
    pos = phase
    for j in range(c0, c1):
        for r in range(m):
            if first[j, r]:
                fsyms[f_pos] = syms[j, r]
                f_pos += 1
            else:
                gsyms[g_pos] = syms[j, r]
                g_pos += 1
            if j > 0 and dq[j - 1, r] >= ESCAPE:
                escapes[e_pos] = dq[j - 1, r] - ESCAPE
                e_pos += 1
            n = nbits[j, r]
            if n:
                w, off = pos >> 6, pos & 63
                v = np.uint64(extra[j, r])
                words[w] |= v << np.uint64(off)
                if off + n > 64:
                    words[w + 1] |= v >> np.uint64(64 - off)
                pos += n


def _keep_mass_at_most_one(top: np.ndarray, codes: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Lower a row's top (whole 1/64-nat steps) where rounding would make its decoded top-k
    mass exceed 1: the tail mass 1 - sum(p) must stay >= 0. A common shift of the row leaves
    the renormalised distribution, hence the KL, unchanged."""
    for _ in range(3):  # float32 rounding of the decoded sum may need one more step
        top_lp = -top.astype(np.float32) * np.float32(kern.TOP_STEP)
        decoded = top_lp[:, None] + levels[codes]  # float32, exactly as the decoder adds
        mass = np.exp(decoded.astype(np.float64)).sum(axis=1)
        over = mass > 1.0
        if not over.any():
            break
        need = np.ceil(np.log(mass[over]) / kern.TOP_STEP).astype(np.int64)
        top[over] = np.minimum(top[over] + np.maximum(need, 1), MAX_CODE)
    return top


class Rows:
    """Row-local arrays of a window (or of one block of its rows), filled block by block."""

    def __init__(self, values: np.ndarray, rate_control: bool) -> None:
        m, k = values.shape
        self.values = values
        self.top = np.empty(m, dtype=np.int64)
        self.top_lp = np.empty(m, dtype=np.float32)
        self.rel = np.empty((m, k), dtype=np.float64)
        self.half_exp = np.empty((m, k), dtype=np.float64)
        self.argmax = np.empty(m, dtype=np.int64)
        self.p = np.empty((m, k), dtype=np.float64) if rate_control else None
        self.weights = np.empty((m, k), dtype=np.float64) if rate_control else None

    def prepare(self, a: int, b: int) -> None:
        step = _rows_of(CHUNK, self.values.shape[1], 1)
        for c in range(a, b, step):
            self._prepare(c, min(c + step, b))

    def _prepare(self, a: int, b: int) -> None:
        values = self.values[a:b]
        top = np.clip(np.rint(-values.max(axis=1) / kern.TOP_STEP), 0, MAX_CODE).astype(np.int64)
        top_lp = (-top.astype(np.float32) * np.float32(kern.TOP_STEP)).astype(np.float32)
        self.top[a:b], self.top_lp[a:b] = top, top_lp
        rel = np.minimum(values - top_lp[:, None], 0.0).astype(np.float64)
        self.rel[a:b] = rel
        np.exp(rel / 2.0, out=self.half_exp[a:b])
        self.argmax[a:b] = values.argmax(axis=1)
        if self.p is not None:
            p = values.astype(np.float64)
            p -= p.max(axis=1, keepdims=True)
            p -= np.log(np.exp(p).sum(axis=1, keepdims=True))
            self.p[a:b] = p
            np.exp(p, out=self.weights[a:b])


def choose_sqrt_step(codec: "QRankCodec", m: int, k: int, kl: Callable[[int], float]) -> int:
    """Largest sqrt_step on the ladder whose mean renormalised KL on these rows is within
    kl_target (rate-distortion control: spend the KL budget, not more); units of 1e-4.
    `kl(units)`: the mean row KL of the window's m rows at that step (`block_kls`, summed by
    `mean_in_order`), wherever its blocks run."""
    if not rate_controlled(codec, m, k):
        return codec.sqrt_units
    ladder = [u for u in SQRT_LADDER if u * SQRT_UNIT < codec.step_max] or [codec.sqrt_units]
    i = int(np.argmin([abs(u - codec.sqrt_units) for u in ladder]))
    if kl(ladder[i]) <= codec.kl_target:
        while i + 1 < len(ladder) and kl(ladder[i + 1]) <= codec.kl_target:
            i += 1
    else:
        while i > 0:
            i -= 1
            if kl(ladder[i]) <= codec.kl_target:
                break
    return ladder[i]


def rate_controlled(codec: "QRankCodec", m: int, k: int) -> bool:
    return codec.kl_target is not None and m > 0 and k > 1


def row_blocks(m: int, k: int, parts: int) -> list[tuple[int, int]]:
    """A window's row blocks for `parts` workers (even starts: a dq byte holds two rows)."""
    return split(m, parts, multiple=2, minimum=_rows_of(MIN_BLOCK, k, 2))


def window_layout(m: int, k: int, n_blocks: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The window-wide arrays the row blocks write and the stream assembly reads:
    name -> (dtype, shape). Zero-filled where allocated (nibbles and counts rely on it)."""
    return {"top": ("<i8", (m,)), "row_kls": ("<f8", (m,)),
            "dq": ("<u2", (k - 1, m)), "nibbles": ("u1", (k - 1, (m + 1) // 2)),
            "first": ("?", (k, m)), "syms": ("u1", (k, m)), "nbits": ("u1", (k, m)),
            "extra": ("<u4", (k, m)), "counts": ("<i8", (n_blocks, 3, k))}  # first, bits, esc


def block_kls(codec: "QRankCodec", units: int, rows: "Rows", lo: int, hi: int,
              out: np.ndarray) -> None:
    """out = each row's renormalised KL at sqrt_step units, rows lo..hi of `rows`."""
    quantizer, levels, exp_shifted = codec._quantizer(units)
    row_kl(rows.p[lo:hi], rows.weights[lo:hi], rows.rel[lo:hi], rows.half_exp[lo:hi],
           quantizer._y_top, quantizer.threshold, quantizer.sqrt_step, quantizer.step_max,
           levels, exp_shifted, out)


def symbolize_block(codec: "QRankCodec", units: int, rows: "Rows", lo: int, hi: int,
                    ids: np.ndarray, out: dict[str, np.ndarray], r0: int,
                    counts: np.ndarray) -> None:
    """Rows lo..hi of `rows` (window rows r0.., ids [hi - lo, k]) quantised, their tops
    lowered where the decoded mass would exceed 1, sorted and symbolised into the window's
    arrays `out` (window_layout); counts: this block's [3, k]."""
    q, levels, _ = codec._quantizer(units)
    k = ids.shape[1]
    mb = hi - lo
    codes = np.empty((mb, k), dtype=np.int64)
    quantize_rows(rows.rel[lo:hi], rows.half_exp[lo:hi], rows.argmax[lo:hi], q._y_top,
                  q.threshold, math.exp(q.threshold / 2.0), q.sqrt_step, q.step_max, codes)
    top = rows.top[lo:hi]
    chunk = _rows_of(CHUNK, k, 1)
    for c in range(0, mb, chunk):
        d = min(c + chunk, mb)
        top[c:d] = _keep_mass_at_most_one(top[c:d], codes[c:d], levels)
    out["top"][r0:r0 + mb] = top
    sort_and_symbolize(codes, codec.rank_table.ranks(ids), r0, out["dq"], out["nibbles"],
                       out["first"], out["syms"], out["nbits"], out["extra"], counts[0],
                       counts[1], counts[2])


def assemble_streams(out: dict[str, np.ndarray], m: int, k: int,
                     pool: BlockPool) -> tuple[int, list[bytes], bytes]:
    """(total extra bits, the six byte streams, packed extra bits) from the window's
    symbolised arrays: column blocks on `pool`'s threads (numba, nogil)."""
    first, syms, nbits, extra, dq = (out[n] for n in ("first", "syms", "nbits", "extra", "dq"))
    n_first, col_nbits, n_esc = out["counts"].sum(axis=0)
    col_bits = np.concatenate([[0], np.cumsum(col_nbits)]).astype(np.int64)
    f_starts = np.concatenate([[0], np.cumsum(n_first)])
    g_starts = np.concatenate([[0], np.cumsum(m - n_first)])
    e_starts = np.concatenate([[0], np.cumsum(n_esc)])
    total_bits = int(col_bits[-1])
    fsyms = np.empty(int(f_starts[-1]), dtype=np.uint8)
    gsyms = np.empty(int(g_starts[-1]), dtype=np.uint8)
    escapes = np.empty(int(e_starts[-1]), dtype="<u2")
    words = np.zeros(total_bits // 64 + 2, dtype=np.uint64)
    column_blocks = split(k, pool.workers) if m else []

    def columns_block(cc: tuple[int, int]) -> tuple[int, np.ndarray]:
        c0, c1 = cc
        start, end = int(col_bits[c0]), int(col_bits[c1])
        local = np.zeros((start % 64 + end - start) // 64 + 2, dtype=np.uint64)
        split_columns(c0, c1, first, syms, nbits, extra, dq, fsyms, f_starts[c0], gsyms,
                      g_starts[c0], escapes, e_starts[c0], local, start % 64)
        return start // 64, local

    for w0, local in pool.map(columns_block, column_blocks):  # ranges share edge words: OR
        words[w0:w0 + local.size] |= local[:words.size - w0]
    streams = [out["top"].astype("<u2").tobytes(), out["nibbles"].tobytes(), escapes.tobytes(),
               fsyms.tobytes(), gsyms.tobytes(), col_bits.astype("<u8").tobytes()]
    return total_bits, streams, words.tobytes()


def encode_topk_streams(codec: "QRankCodec", ids: np.ndarray, values: np.ndarray,
                        pool: BlockPool) -> tuple[int, int, list[bytes], bytes]:
    """(sqrt_step units, total extra bits, the six byte streams, packed extra bits) of one
    window's valid rows: ids int [m, k], values float32 [m, k]; row blocks on `pool`'s
    threads (qrank_procs runs the same blocks in worker processes)."""
    m, k = ids.shape
    blocks = row_blocks(m, k, 2 * pool.workers)
    rows = Rows(values, rate_control=rate_controlled(codec, m, k))
    pool.map(lambda ab: rows.prepare(*ab), blocks)
    out = {name: np.zeros(shape, dtype=dtype)
           for name, (dtype, shape) in window_layout(m, k, len(blocks)).items()}

    def kl(units: int) -> float:
        pool.map(lambda ab: block_kls(codec, units, rows, ab[0], ab[1],
                                      out["row_kls"][ab[0]:ab[1]]), blocks)
        return float(mean_in_order(out["row_kls"]))

    units = choose_sqrt_step(codec, m, k, kl)
    pool.map(lambda ib: symbolize_block(codec, units, rows, ib[1][0], ib[1][1],
                                        ids[ib[1][0]:ib[1][1]], out, ib[1][0],
                                        out["counts"][ib[0]]), list(enumerate(blocks)))
    total_bits, streams, words = assemble_streams(out, m, k, pool)
    return units, total_bits, streams, words
