"""qrank's block-parallel top-k encoder (qrank_topk.py) writes the blob a plain one-pass numpy
encoder writes, byte for byte, for any block size and thread count; the writer's validation on
row blocks reports the same errors."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.errors import TargetValidationError
from kdcache.formats.codecs import qrank_kernels as kern
from kdcache.formats.codecs import qrank_topk
from kdcache.formats.codecs.blocks import block_pool, split
from kdcache.formats.codecs.qrank import QRankCodec
from kdcache.formats.codecs.quantize import MAX_CODE
from kdcache.formats.codecs.rank_table import RankTable
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.synthetic import synthetic_targets, synthetic_window
from kdcache.formats.validate import validate_window

V = 5000


def _reference_streams(codec: QRankCodec, ids: np.ndarray, values: np.ndarray, units: int):
    """The streams of qrank.py's layout from whole-window numpy steps (the encoder before it was
    cut into blocks), for the step `units` the rate control chose."""
    m, k = ids.shape
    top = np.clip(np.rint(-values.max(axis=1) / kern.TOP_STEP), 0, MAX_CODE).astype(np.int64)
    top_lp = (-top.astype(np.float32) * np.float32(kern.TOP_STEP)).astype(np.float32)
    quantizer, levels, _ = codec._quantizer(units)
    codes = quantizer.encode(np.minimum(values - top_lp[:, None], 0.0))
    codes[np.arange(m), values.argmax(axis=1)] = 0
    top = qrank_topk._keep_mass_at_most_one(top, codes, levels)
    ranks = codec.rank_table.ranks(ids)
    order = np.argsort((codes << 31) | ranks, axis=1, kind="stable")
    codes = np.take_along_axis(codes, order, axis=1).T
    ranks = np.take_along_axis(ranks, order, axis=1).T
    dq = np.diff(codes, axis=0)
    first = np.ones((k, m), dtype=bool)
    first[1:] = dq > 0
    gaps = np.zeros_like(ranks)
    gaps[1:] = ranks[1:] - ranks[:-1] - 1
    syms, nbits, extra = kern.symbolize(np.where(first, ranks, gaps).ravel())
    words = kern.pack_bits(nbits, extra)
    col_bits = np.concatenate([[0], np.cumsum(nbits.reshape(k, m).sum(axis=1))])
    nibbles = np.zeros((k - 1, m + m % 2), dtype=np.uint8)
    nibbles[:, :m] = np.minimum(dq, 15)
    flat_dq, flat_first = dq.ravel(), first.ravel()
    streams = [top.astype("<u2").tobytes(), (nibbles[:, 0::2] << 4 | nibbles[:, 1::2]).tobytes(),
               (flat_dq[flat_dq >= 15] - 15).astype("<u2").tobytes(),
               syms[flat_first].tobytes(), syms[~flat_first].tobytes(),
               col_bits.astype("<u8").tobytes()]
    return int(nbits.sum()), streams, words.tobytes()


def _hard_rows(k: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic rows plus the cases the fast paths must get right: flat rows (one tie group
    of k: the insertion sort gives up), rows slightly out of order (codes fall somewhere),
    improbable entries (dq escapes), near-ties at the top."""
    ids, lp = synthetic_targets(np.random.default_rng(seed), m, V, k)
    lp[:5] = np.float32(-np.log(V))  # flat
    lp[20:25, 0] = -1e-7
    if k > 1:
        lp[5:10, 1] = lp[5:10, 0] - 1e-6
        lp[15:20, k // 2:] -= 60  # a cliff: escaped code steps
    if k > 2:
        lp[10:15, 2] = lp[10:15, 1] + 5e-6  # out of order within the validator's slack
    return ids, lp


@pytest.mark.parametrize("k", [1, 2, 16, 64])
@pytest.mark.parametrize("m", [0, 1, 7, 1001])
def test_blocks_write_the_one_pass_blob(k, m, monkeypatch):
    ids, lp = _hard_rows(k, max(m, 25), seed=k * 7 + m)
    ids, lp = ids[:m], lp[:m]
    table = RankTable.from_sample(V, ids[: max(1, m // 2)]).to_bytes() if m else None
    codec = QRankCodec(kind="topk", k=k, vocab_size=V, table=table)
    inline = codec.encode(ids, lp)
    monkeypatch.setattr(qrank_topk, "MIN_BLOCK", 2 * k)
    monkeypatch.setattr(qrank_topk, "CHUNK", 3 * k)
    for threads in (2, 3):
        assert codec.encode(ids, lp, pool=block_pool(threads)) == inline
    units = int.from_bytes(inline[6:8], "little")
    total_bits, streams, bits = _reference_streams(codec, ids, lp, units)
    assert inline == codec._pack(m, 0, total_bits, streams, bits, param=units)
    if m:
        got_ids, got_lp = codec.decode(inline, m)
        assert (np.sort(got_ids, axis=1) == np.sort(ids, axis=1)).all()


def test_rate_control_picks_the_same_step_on_blocks(monkeypatch):
    """The KL summed over rows in row order, whatever the blocks: the same step as one block,
    on rows whose mean KL sits near the budget at several steps."""
    ids, lp = synthetic_targets(np.random.default_rng(5), 3000, V, 32)
    for kl_target in (1e-5, 2e-4, 7e-4, 3e-3):
        codec = QRankCodec(kind="topk", k=32, vocab_size=V, kl_target=kl_target)
        inline = codec.encode(ids, lp)
        monkeypatch.setattr(qrank_topk, "MIN_BLOCK", 64)
        assert codec.encode(ids, lp, pool=block_pool(3)) == inline
        monkeypatch.undo()


def test_every_quantiser_table_falls():
    """row_kl's lookup of exp(q - max q) needs decode tables that never rise (a table that did
    would be refused by exp_shifted_levels, not mis-measured)."""
    codec = QRankCodec(kind="topk", k=4, vocab_size=V)
    for units in qrank_topk.SQRT_LADDER + (codec.sqrt_units,):
        _, levels, shifted = codec._quantizer(units)
        assert (np.diff(levels) <= 0).all() and shifted[0] == 1.0
    with pytest.raises(ValueError, match="rises"):
        qrank_topk.exp_shifted_levels(np.array([0.0, -1.0, -0.5], dtype=np.float32))


def test_split_covers_the_range_with_even_starts():
    assert split(0, 4) == [(0, 0)]
    for n in (1, 7, 1000, 1001):
        parts = split(n, 3, multiple=2, minimum=2)
        assert parts[0][0] == 0 and parts[-1][1] == n and len(parts) <= 3
        assert all(a % 2 == 0 and a < b for a, b in parts)
        assert all(b == c for (_, b), (c, _) in zip(parts, parts[1:]))


def test_validation_on_blocks_names_the_bad_row(monkeypatch):
    from kdcache.formats import validate

    header = DatasetHeader(kind="topk", k=8, vocab_size=V, codec="qrank",
                           packing={"window": 4096, "mode": "causal"})
    rec = synthetic_window(np.random.default_rng(1), 0, 4096, V, 8, mode="causal")
    monkeypatch.setattr(validate, "_BLOCK_ROWS", 64)
    ids, values = validate_window(rec, header, where="w", pool=block_pool(3))
    ref_ids, ref_values = validate_window(rec, header, where="w")
    assert (ids == ref_ids).all() and (values == ref_values).all()
    rec.values[3000, 2] = np.nan
    with pytest.raises(TargetValidationError, match="row 3000: log-prob is NaN"):
        validate_window(rec, header, where="w", pool=block_pool(3))


def test_a_forked_child_encodes_on_its_own_pool():
    """The pool's threads do not survive fork(): a child that encodes gets new ones instead of
    queueing work no thread will run."""
    import os

    ids, lp = synthetic_targets(np.random.default_rng(2), 2000, V, 16)
    codec = QRankCodec(kind="topk", k=16, vocab_size=V)
    pool = block_pool(2)
    blob = codec.encode(ids, lp, pool=pool)  # the parent's threads exist now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: same bytes from a fresh pool, then leave without cleanup
        try:
            same = codec.encode(ids, lp, pool=block_pool(2)) == blob
            os.write(write, b"1" if same else b"0")
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 1)
    os.waitpid(pid, 0)
    assert got == b"1"
