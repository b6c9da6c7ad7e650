"""numba kernels of the `qrank` codec: the per-entry loops that numpy cannot vectorise.

Integer code (for ranks and rank gaps, any value below 2^31): v = x + 1, e = floor(log2 v).
Values 1..3 are symbols 0..2 with no extra bits; otherwise the symbol is 3 + 4 (e - 2) + the two
bits of v below its leading one, followed by e - 2 raw extra bits (the rest of v). So the symbol
carries the magnitude and the leading bits (where a Zipf-like distribution has its information,
entropy-coded by zstd's Huffman stage), the extra bits are close to uniform and stored packed.
Symbols fit a byte (at most 122 for x < 2^31).

Extra bits are packed least-significant first into uint64 words, one word of padding at the end
so the reader may always load two words.

Decoding traverses entries column by column (all rows' entry 0, then all rows' entry 1, ...),
matching the encoder's stream order: column-major streams let zstd's per-block Huffman tables
adapt to how value gaps and ranks change with position in the row. Every stream read is bounds
checked; a kernel returns a negative status instead of reading out of bounds on corrupt input.
"""

from __future__ import annotations

import numba
import numpy as np

N_SYMBOLS = 123
# Tables cover every byte: a corrupt symbol >= N_SYMBOLS decodes to a rank no vocabulary holds,
# which the decoder reports, so the inner loop needs no symbol check.
_SYM_BASE = np.full(256, 2**40, dtype=np.int64)
_SYM_BITS = np.zeros(256, dtype=np.int64)
for _s in range(N_SYMBOLS):
    if _s < 3:
        _SYM_BASE[_s] = _s + 1
    else:
        _e, _mant = (_s - 3) // 4 + 2, (_s - 3) % 4
        _SYM_BASE[_s], _SYM_BITS[_s] = (4 + _mant) << (_e - 2), _e - 2
SYM_BASE, SYM_BITS = _SYM_BASE, _SYM_BITS

# Status codes of the decoders (0 = ok).
OK, ERR_STREAM, ERR_SYMBOL, ERR_BITS, ERR_RANGE, ERR_LEFTOVER = 0, -1, -2, -3, -4, -5


def symbolize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(symbols uint8, extra-bit counts int64, extra-bit values uint64) for x >= 0 (int64)."""
    x = np.ascontiguousarray(x, dtype=np.int64).ravel()
    syms = np.empty(x.size, dtype=np.uint8)
    nbits = np.empty(x.size, dtype=np.int64)
    extra = np.empty(x.size, dtype=np.uint64)
    _symbolize(x, syms, nbits, extra)
    return syms, nbits, extra


@numba.njit(cache=True, nogil=True)
def _symbolize(x, syms, nbits, extra):
    for i in range(x.shape[0]):
        v = x[i] + 1
        e = _floor_log2(v)
        if e < 2:
            syms[i] = v - 1
            nbits[i] = 0
            extra[i] = 0
        else:
            nb = e - 2
            syms[i] = 3 + 4 * nb + ((v >> nb) & 3)
            nbits[i] = nb
            extra[i] = np.uint64(v & ((np.int64(1) << nb) - 1))


@numba.njit(inline="always")
def _floor_log2(v):
    """floor(log2 v) for 0 < v < 2^63, by halving the search range."""
    e = 0
    for shift in (32, 16, 8, 4, 2, 1):
        if v >> shift:
            v >>= shift
            e += shift
    return e


@numba.njit(cache=True, nogil=True)
def pack_bits(nbits: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Pack values[i] (nbits[i] <= 32 bits each) LSB-first into uint64 words (+1 padding word)."""
    total = 0
    for n in nbits:
        total += n
    out = np.zeros(total // 64 + 2, dtype=np.uint64)
    pos = 0
    for i in range(nbits.shape[0]):
        n = nbits[i]
        if n == 0:
            continue
        w, off = pos >> 6, pos & 63
        v = values[i]
        out[w] |= v << np.uint64(off)
        if off + n > 64:
            out[w + 1] |= v >> np.uint64(64 - off)
        pos += n
    return out


@numba.njit(inline="always")
def _read_bits(words, pos, n):
    # Branch-free: the high word is shifted in two steps so that off == 0 never shifts by 64.
    w, off = np.uint64(pos >> 6), pos & 63
    lo = words[w] >> np.uint64(off)
    hi = (words[w + np.uint64(1)] << np.uint64(1)) << np.uint64(63 - off)
    return np.int64((lo | hi) & ((np.uint64(1) << np.uint64(n)) - np.uint64(1)))


@numba.njit(inline="always")
def _rank_to_id(rank, ids_by_rank, escape_keys):
    n = ids_by_rank.shape[0]
    if rank < n:
        return np.int64(ids_by_rank[np.uint64(rank)])
    x = rank - n
    lo, hi = 0, n  # count of escape_keys[j] <= x (binary search, keys non-decreasing)
    while lo < hi:
        mid = (lo + hi) >> 1
        if escape_keys[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return x + lo


TILE_ROWS = 64  # rows decoded together: their output (TILE_ROWS x k) stays in L1 cache
TOP_STEP = 1.0 / 64  # nats per unit of a row's stored top log-prob (uint16)
SYM_PADDING = TILE_ROWS + 8  # zero bytes after each symbol stream: the decoder may read ahead
WORD_PADDING = TILE_ROWS * 32 // 64 + 2  # zero words after the bits: a tile-column reads <= 32 b/row


@numba.njit(cache=True, nogil=True)
def decode_topk(m, k, top, dq, dq_escape, fsyms, n_f, gsyms, n_g, words, n_words, col_bits,
                sym_base, sym_bits, levels, ids_by_rank, escape_keys, vocab, out_ids, out_lp):
    """Rebuild ids int32 [m, k] and log-probs float32 [m, k]; returns a status code.

    Streams are column-major over all m rows; rows are decoded in tiles of TILE_ROWS with one
    read position per column and stream, found by a first pass over the code gaps (dq). Within a
    tile and column the work is split into short loops over the tile's rows, so that all but the
    bit-reading one are free of loop-carried dependencies and compile to SIMD.
    fsyms/gsyms hold n_f/n_g symbols followed by SYM_PADDING bytes and words n_words words
    followed by WORD_PADDING, so the inner loop can read both symbol streams unconditionally,
    keep the one the entry uses (no branch) and read bits unclamped; positions are range-checked
    once per tile and column (a tile cannot run more than TILE_ROWS entries past its end).
    Ids from the table are valid by construction; only escape ranks need a range check. Indices are cast to unsigned so numba emits no
    negative-index wraparound.
    """
    U = np.uint64
    n_levels = levels.shape[0]
    n_e = dq_escape.shape[0]
    n_tab = ids_by_rank.shape[0]
    half = (m + 1) // 2  # dq bytes per column: two rows' nibbles each
    if dq.shape[0] != half * (k - 1) or top.shape[0] != m or col_bits.shape[0] != k + 1 \
            or fsyms.shape[0] < n_f + SYM_PADDING or gsyms.shape[0] < n_g + SYM_PADDING \
            or n_words < 1 or words.shape[0] < n_words + WORD_PADDING:
        return ERR_STREAM
    total_bits = (n_words - 1) * 64 - 1  # a read may always touch the next word
    f_pos = np.zeros(k + 1, dtype=np.int64)
    g_pos = np.zeros(k + 1, dtype=np.int64)
    e_pos = np.zeros(k + 1, dtype=np.int64)
    b_pos = np.zeros(k + 1, dtype=np.int64)
    # Pass 1: where each column starts in the first/gap/escape streams.
    f_pos[1] = m
    for col in range(1, k):
        base = (col - 1) * half
        nf = 0
        ne = 0
        for i in range(half):
            b = dq[base + i]
            hi = b >> 4
            lo = b & 15
            nf += (hi > 0) + (lo > 0)
            ne += (hi == 15) + (lo == 15)
        f_pos[col + 1] = f_pos[col] + nf
        g_pos[col + 1] = g_pos[col] + (m - nf)
        e_pos[col + 1] = e_pos[col] + ne
    if f_pos[k] != n_f or g_pos[k] != n_g or e_pos[k] != n_e:
        return ERR_LEFTOVER
    # Every column's bit range inside the stream, before any read: column 0 starts at bit 0,
    # starts never fall (so none is negative) and none passes the end.
    if col_bits[0] != 0:
        return ERR_BITS
    for col in range(k + 1):
        b_pos[col] = col_bits[col]
        if b_pos[col] < 0 or b_pos[col] > total_bits or (col > 0 and b_pos[col] < b_pos[col - 1]):
            return ERR_BITS
    f_end = f_pos.copy()
    g_end = g_pos.copy()
    e_end = e_pos.copy()
    cur = np.empty(TILE_ROWS, dtype=np.int64)
    prev = np.empty(TILE_ROWS, dtype=np.int64)
    base_lp = np.empty(TILE_ROWS, dtype=np.float32)
    steps = np.zeros(TILE_ROWS + 1, dtype=np.int64)
    # Pass 2: tiles of rows; within a tile, column by column.
    for r0 in range(0, m, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, m)
        fp = f_pos[0]
        bp = b_pos[0]
        b_end = col_bits[1]
        for r in range(r0, r1):
            # Entry 0 has code 0 by construction: it is the row's top log-prob itself.
            top_lp = np.float32(-np.float32(top[r]) * np.float32(TOP_STEP))
            s = U(fsyms[U(fp)])
            fp += 1
            nb = sym_bits[s]
            if bp + nb > b_end:
                return ERR_RANGE
            rank = (sym_base[s] | _read_bits(words, bp, nb)) - 1
            bp += nb
            cur[U(r - r0)] = 0
            prev[U(r - r0)] = rank
            base_lp[U(r - r0)] = top_lp
            out_lp[U(r), 0] = top_lp
            tok = _rank_to_id(rank, ids_by_rank, escape_keys)
            if tok >= vocab:
                return ERR_RANGE
            out_ids[U(r), 0] = tok
        f_pos[0] = fp
        b_pos[0] = bp
        nt = r1 - r0
        for col in range(1, k):
            base = (col - 1) * half + (r0 >> 1)  # r0 is even: the tile starts on a byte
            fp, gp, ep = f_pos[col], g_pos[col], e_pos[col]
            bp = b_pos[col]
            # Stage A (vectorisable): code steps from the nibbles; escapes fixed up apart.
            escaped = False
            for j in range((nt + 1) >> 1):
                b = dq[U(base + j)]
                steps[2 * j] = b >> 4
                steps[2 * j + 1] = b & 15
            for j in range(nt):
                escaped |= steps[j] == 15
            if escaped:
                for j in range(nt):
                    if steps[j] == 15:
                        if ep >= n_e:
                            return ERR_STREAM
                        steps[j] += dq_escape[U(ep)]
                        ep += 1
            # Stage B (vectorisable): codes and log-probs.
            for j in range(nt):
                c = cur[j] + steps[j]
                cur[j] = c
                out_lp[U(r0 + j), U(col)] = base_lp[j] + levels[U(min(c, n_levels - 1))]
            # Stage C (sequential: one bit position): ranks from first/gap symbols + extra bits.
            for j in range(nt):
                first = np.int64(steps[j] > 0)
                fs = np.int64(fsyms[U(fp)])
                gs = np.int64(gsyms[U(gp)])
                s = U(gs + first * (fs - gs))  # the first-symbol if first, else the gap-symbol
                fp += first
                gp += 1 - first
                nb = sym_bits[s]
                v = sym_base[s] | _read_bits(words, bp, nb)
                bp += nb
                prev[j] = v + (1 - first) * prev[j] - first  # v - 1 if first, else prev + v
            # Stage D: ranks -> ids through the table; escape ranks fixed up apart.
            escaped = False
            if n_tab > 0:
                for j in range(nt):
                    rank = prev[j]
                    escaped |= rank >= n_tab
                    out_ids[U(r0 + j), U(col)] = ids_by_rank[U(min(rank, n_tab - 1))]
            else:
                escaped = True
            if escaped:
                for j in range(nt):
                    if prev[j] >= n_tab:
                        tok = _rank_to_id(prev[j], ids_by_rank, escape_keys)
                        if tok >= vocab:
                            return ERR_RANGE
                        out_ids[U(r0 + j), U(col)] = tok
            # Positions and codes only grow, so checking them once per tile and column suffices
            # (reads in between stay in bounds: padding, clamped level index).
            if bp > col_bits[col + 1] or fp > f_end[col + 1] or gp > g_end[col + 1]:
                return ERR_STREAM
            if col == k - 1:
                for j in range(nt):
                    if cur[j] >= n_levels:
                        return ERR_RANGE
            f_pos[col], g_pos[col], e_pos[col], b_pos[col] = fp, gp, ep, bp
    # Every stream used up exactly: each column ends where the next one starts.
    for col in range(k):
        if b_pos[col] != col_bits[col + 1] or f_pos[col] != f_end[col + 1] \
                or g_pos[col] != g_end[col + 1] or e_pos[col] != e_end[col + 1]:
            return ERR_LEFTOVER
    return OK


@numba.njit(cache=True, nogil=True)
def decode_ranks(n, syms, words, total_bits, sym_base, sym_bits, ids_by_rank, escape_keys,
                 vocab, out_ids):
    """Decode n independently coded ranks into ids (the sampled kind); returns a status code."""
    if syms.shape[0] != n:
        return ERR_STREAM
    bp = 0
    for i in range(n):
        s = syms[i]
        nb = sym_bits[s]
        v = sym_base[s]
        if bp + nb > total_bits:
            return ERR_BITS
        v |= _read_bits(words, bp, nb)
        bp += nb
        tok = _rank_to_id(v - 1, ids_by_rank, escape_keys)
        if tok >= vocab:
            return ERR_RANGE
        out_ids[i] = tok
    if bp != total_bits:  # the bit string used up exactly
        return ERR_LEFTOVER
    return OK
