"""Target codecs: round trips for both kinds, the KL budget, and clean failures on bad blobs."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.errors import KdcacheError
from kdcache.formats.codecs import (QRankCodec, RawCodec, available_codecs, default_codec,
                                    get_codec)
from kdcache.formats.codecs.quantize import LogProbQuantizer
from kdcache.formats.codecs.rank_table import RankTable

VOCABS = (2, 255, 256, 65_536, 65_537, 202_048, 2**31 - 1)
KS = (1, 3, 64, 256)


def synthetic_topk(m: int, k: int, vocab: int, seed: int = 0, spread: float = 2.5):
    """Peaked, Zipf-like top-k: ids drawn by a Zipf law over a pool of common ids (spread
    across the vocabulary), log-probs of a softmax with a random tail mass, rows descending."""
    rng = np.random.default_rng(seed)
    pool = min(vocab, max(4 * k, 2048))
    if vocab <= 4_000_000:
        pool_ids = rng.permutation(vocab)[:pool]
    else:
        pool_ids = np.unique(rng.integers(0, vocab, size=2 * pool))[:pool]
        pool = pool_ids.size
    zipf = 1.0 / np.arange(1, pool + 1)
    zipf /= zipf.sum()
    ids = np.empty((m, k), dtype=np.int64)
    logits = rng.standard_normal((m, k)) * spread
    logits[:, 0] += rng.exponential(3.0, size=m)  # a peak, of varying height
    for r in range(m):
        ids[r] = pool_ids[rng.choice(pool, size=k, replace=False, p=zipf)]
    tail = rng.uniform(0.01, 0.4, size=(m, 1)) if k < vocab else np.zeros((m, 1))
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True) + np.log1p(-tail)
    lp = -np.sort(-lp, axis=1)
    return ids, lp.astype(np.float32)


def synthetic_sampled(m: int, k: int, vocab: int, draws: int, seed: int = 0):
    """RS-KD-like targets: n_i <= k distinct ids per row with count/draws weights, -1 padded."""
    rng = np.random.default_rng(seed)
    ids = np.full((m, k), -1, dtype=np.int64)
    weights = np.zeros((m, k), dtype=np.float32)
    for r in range(m):
        n = int(rng.integers(1, min(k, vocab, draws) + 1))
        row_ids = rng.choice(min(vocab, 10 * k + 10), size=n, replace=False)
        counts = np.bincount(rng.integers(0, n, size=draws - n), minlength=n) + 1
        ids[r, :n] = row_ids
        weights[r, :n] = (counts / draws).astype(np.float32)
    return ids, weights


def renorm_kl(ids, lp, dec_ids, dec_lp):
    o, d = np.argsort(ids, axis=1), np.argsort(dec_ids, axis=1)
    p = np.take_along_axis(lp, o, 1).astype(np.float64)
    q = np.take_along_axis(dec_lp, d, 1).astype(np.float64)
    p -= np.logaddexp.reduce(p, axis=1, keepdims=True)
    q -= np.logaddexp.reduce(q, axis=1, keepdims=True)
    return (np.exp(p) * (p - q)).sum(axis=1)


def check_topk_roundtrip(codec, ids, lp):
    m, k = ids.shape
    blob = codec.encode(ids, lp)
    dec_ids, dec_lp = codec.decode(blob, m)
    assert dec_ids.dtype == np.int32 and dec_lp.dtype == np.float32
    assert dec_ids.shape == (m, k) and dec_lp.shape == (m, k)
    # The id set of each row is kept exactly; values come back sorted descending.
    np.testing.assert_array_equal(np.sort(dec_ids, axis=1), np.sort(ids, axis=1))
    assert (np.diff(dec_lp, axis=1) <= 0).all()
    # A sub-distribution still: the tail mass 1 - sum(p) stays >= 0 (dec_lp[:, 0] <= 0 too).
    assert (np.exp(dec_lp.astype(np.float64)).sum(axis=1) <= 1.0).all()
    # Each id keeps (about) its log-prob: match rows id by id. Besides half a step, a row may be
    # shifted down a little so that its decoded mass stays <= 1.
    o, d = np.argsort(ids, axis=1), np.argsort(dec_ids, axis=1)
    err = np.abs(np.take_along_axis(lp, o, 1) - np.take_along_axis(dec_lp, d, 1))
    assert err.max(initial=0) <= codec.quantizer.step_max / 2 + 0.05
    return blob, dec_ids, dec_lp


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", (0, 1, 37))
def test_qrank_topk_roundtrip(vocab, k, m):
    if k > vocab:
        pytest.skip("k distinct ids need k <= vocab")
    ids, lp = synthetic_topk(m, k, vocab, seed=vocab % 1000 + k + m)
    table = QRankCodec.build_table(vocab_size=vocab, sample_ids=ids[: max(m // 2, 1)])
    for tab in (None, table):
        codec = QRankCodec(kind="topk", k=k, vocab_size=vocab, table=tab)
        check_topk_roundtrip(codec, ids, lp)


def test_qrank_table_covers_ids_it_never_saw():
    """Ids outside the table (escape ranks) decode through the search path, at the top of a
    2^31-1 vocabulary too."""
    vocab = 2**31 - 1
    ids, lp = synthetic_topk(50, 16, vocab, seed=3)
    ids[:, -1] = vocab - 1 - np.arange(50)  # far above anything in the table
    lp[:, -1] = lp[:, -2] - 0.5
    table = QRankCodec.build_table(vocab_size=vocab, sample_ids=ids[:10, :8])
    codec = QRankCodec(kind="topk", k=16, vocab_size=vocab, table=table)
    assert codec.rank_table.size > 0
    check_topk_roundtrip(codec, ids, lp)


def test_qrank_kl_within_budget_on_peaked_targets():
    ids, lp = synthetic_topk(3000, 64, 50_000, seed=11)
    table = QRankCodec.build_table(vocab_size=50_000, sample_ids=ids[:1000])
    codec = QRankCodec(kind="topk", k=64, vocab_size=50_000, table=table)
    _, dec_ids, dec_lp = check_topk_roundtrip(codec, ids, lp)
    kl = renorm_kl(ids, lp, dec_ids, dec_lp)
    assert kl.mean() <= 1e-3
    assert kl.max() <= 5e-3
    raw = RawCodec(kind="topk", k=64, vocab_size=50_000)
    assert len(codec.encode(ids, lp)) < len(raw.encode(ids, lp)) / 2


def test_qrank_meets_its_kl_target_and_fixed_steps_order_the_kl():
    ids, lp = synthetic_topk(1500, 64, 50_000, seed=12)
    sizes = []
    for target in (2e-4, 7e-4):
        codec = QRankCodec(kind="topk", k=64, vocab_size=50_000, kl_target=target)
        blob = codec.encode(ids, lp)
        sizes.append(len(blob))
        assert renorm_kl(ids, lp, *codec.decode(blob, 1500)).mean() <= target * (1 + 1e-6)
    assert sizes[1] < sizes[0]  # a larger budget buys fewer bytes
    kls = []
    for step in (0.01, 0.05):
        codec = QRankCodec(kind="topk", k=64, vocab_size=50_000, kl_target=None, sqrt_step=step)
        kls.append(renorm_kl(ids, lp, *codec.decode(codec.encode(ids, lp), 1500)).mean())
    assert kls[0] < kls[1]


def test_qrank_handles_ties_extremes_and_unsorted_order_of_equal_values():
    vocab, k = 1000, 8
    lp = np.array([[-1.5, -1.5 - 1e-6, -1.5 - 1e-6, -3.0, -3.0, -3.0, -80.0, -2e4]],
                  dtype=np.float32)
    ids = np.array([[5, 999, 0, 7, 3, 998, 1, 2]])
    codec = QRankCodec(kind="topk", k=k, vocab_size=vocab)
    dec_ids, dec_lp = codec.decode(codec.encode(ids, lp), 1)
    assert set(dec_ids[0].tolist()) == set(ids[0].tolist())
    assert abs(dec_lp[0, 0] + 1.5) <= 1 / 128 and (np.diff(dec_lp[0]) <= 0).all()
    assert dec_lp[0, -1] < -1e4  # far tails saturate only below about -13,000 nats


@pytest.mark.parametrize("k", (1, 3, 64))
@pytest.mark.parametrize("m", (0, 1, 29))
def test_qrank_sampled_lossless(k, m):
    ids, weights = synthetic_sampled(m, k, 5000, draws=100, seed=k + m)
    for draws in (None, 100):
        table = QRankCodec.build_table(vocab_size=5000, sample_ids=ids)
        codec = QRankCodec(kind="sampled", k=k, vocab_size=5000, table=table, draws=draws)
        dec_ids, dec_w = codec.decode(codec.encode(ids, weights), m)
        np.testing.assert_array_equal(dec_ids, ids)
        np.testing.assert_array_equal(dec_w, weights)
        assert dec_ids.dtype == np.int32 and dec_w.dtype == np.float32


def test_qrank_sampled_counts_are_smaller_and_fall_back_when_not_counts():
    ids, weights = synthetic_sampled(200, 32, 50_000, draws=64, seed=5)
    as_counts = QRankCodec(kind="sampled", k=32, vocab_size=50_000, draws=64)
    as_floats = QRankCodec(kind="sampled", k=32, vocab_size=50_000)
    assert len(as_counts.encode(ids, weights)) < len(as_floats.encode(ids, weights))
    # Weights that are not count/64 are still stored exactly (as float32).
    odd = weights.copy()
    odd[:, 0] = np.where(ids[:, 0] >= 0, odd[:, 0] * 0.999, 0).astype(np.float32)
    dec_ids, dec_w = as_counts.decode(as_counts.encode(ids, odd), 200)
    np.testing.assert_array_equal(dec_w, odd)
    np.testing.assert_array_equal(dec_ids, ids)


@pytest.mark.parametrize("kind", ("topk", "sampled"))
def test_raw_codec_still_exact(kind):
    if kind == "topk":
        ids, values = synthetic_topk(20, 5, 300, seed=1)
    else:
        ids, values = synthetic_sampled(20, 5, 300, draws=10, seed=1)
    codec = RawCodec(kind=kind, k=5, vocab_size=300)
    dec_ids, dec_values = codec.decode(codec.encode(ids, values), 20)
    np.testing.assert_array_equal(dec_ids, ids)
    np.testing.assert_array_equal(dec_values, values)


def test_registry_and_defaults():
    assert {"raw", "qrank"} <= set(available_codecs())
    assert get_codec("qrank") is QRankCodec
    assert default_codec("topk") == "qrank" and default_codec("sampled") == "qrank"
    with pytest.raises(KeyError, match="unknown codec"):
        get_codec("nope")
    assert QRankCodec(kind="topk", k=4, vocab_size=10).config()["step_max"] > 0


def test_quantizer_is_monotone_and_levels_are_fixed_points():
    q = LogProbQuantizer()
    lp = -np.logspace(-8, 4, 5000)[::-1]  # descending from about 0 to -10^4
    codes = q.encode(lp)
    assert (np.diff(codes) <= 0).all() or (np.diff(codes) >= 0).all()
    levels = q.levels()
    assert levels[0] == 0.0 and (np.diff(levels[:2000]) < 0).all()
    np.testing.assert_array_equal(q.encode(levels[:2000]), np.arange(2000))
    with pytest.raises(ValueError):
        LogProbQuantizer(step_max=0.01, sqrt_step=0.1)


def test_rank_table_roundtrip_and_ranks_are_a_bijection():
    vocab = 1000
    rng = np.random.default_rng(0)
    sample = rng.zipf(1.3, size=5000) % vocab
    table = RankTable.from_sample(vocab, sample_ids=sample)
    again = RankTable.from_bytes(table.to_bytes())
    np.testing.assert_array_equal(again.ids_by_rank, table.ids_by_rank)
    ranks = table.ranks(np.arange(vocab))
    np.testing.assert_array_equal(np.sort(ranks), np.arange(vocab))
    counts = np.bincount(sample, minlength=vocab)
    assert counts[table.ids_by_rank[0]] == counts.max()
    from_counts = RankTable.from_sample(vocab, token_counts=counts)
    np.testing.assert_array_equal(from_counts.ids_by_rank, table.ids_by_rank)


def test_codec_rejects_bad_construction():
    table = QRankCodec.build_table(vocab_size=100, sample_ids=np.arange(10))
    with pytest.raises(ValueError, match="vocab"):
        QRankCodec(kind="topk", k=4, vocab_size=200, table=table)
    with pytest.raises(ValueError):
        QRankCodec(kind="topk", k=4, vocab_size=100, table=b"garbage")
    with pytest.raises(ValueError):
        QRankCodec(kind="sampled", k=4, vocab_size=100, draws=0)
    with pytest.raises(ValueError):
        RankTable.from_bytes(table[:-3])


# ---- corrupt blobs ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _codec_and_blob(kind: str):
    if kind == "topk":
        ids, values = synthetic_topk(40, 16, 70_000, seed=9)
        table = QRankCodec.build_table(vocab_size=70_000, sample_ids=ids[:10])
        codec = QRankCodec(kind="topk", k=16, vocab_size=70_000, table=table)
    else:
        ids, values = synthetic_sampled(40, 16, 70_000, draws=50, seed=9)
        codec = QRankCodec(kind="sampled", k=16, vocab_size=70_000, draws=50)
    return codec, codec.encode(ids, values)


def _decode_cleanly(codec, blob: bytes, m: int = 40) -> None:
    """Decoding either raises a clean error or returns well-formed arrays."""
    try:
        ids, values = codec.decode(blob, m)
    except (ValueError, KdcacheError):
        return
    assert ids.shape == (m, codec.k) and values.shape == (m, codec.k)
    assert ids.dtype == np.int32 and values.dtype == np.float32
    assert (ids < codec.vocab_size).all() and (ids >= -1).all()


@pytest.mark.parametrize("kind", ("topk", "sampled"))
def test_truncated_and_mismatched_blobs_raise(kind):
    codec, blob = _codec_and_blob(kind)
    for cut in range(0, len(blob), max(1, len(blob) // 97)):
        with pytest.raises(ValueError):
            codec.decode(blob[:cut], 40)
    with pytest.raises(ValueError):
        codec.decode(blob + b"\0", 40)
    with pytest.raises(ValueError, match="rows"):
        codec.decode(blob, 41)
    other = QRankCodec(kind="sampled" if kind == "topk" else "topk", k=16, vocab_size=70_000)
    with pytest.raises(ValueError):
        other.decode(blob, 40)


@pytest.mark.parametrize("kind", ("topk", "sampled"))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_blobs_never_crash(kind, data):
    codec, blob = _codec_and_blob(kind)
    mutated = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(("flip", "set", "delete", "insert")))
        pos = data.draw(st.integers(0, len(mutated) - 1))
        if op == "flip":
            mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            mutated[pos] = data.draw(st.integers(0, 255))
        elif op == "delete":
            del mutated[pos]
        else:
            mutated.insert(pos, data.draw(st.integers(0, 255)))
    _decode_cleanly(codec, bytes(mutated))


def test_every_single_byte_flip_in_the_header_and_tables_is_caught_or_harmless():
    codec, blob = _codec_and_blob("topk")
    for pos in range(min(len(blob), 200)):
        mutated = bytearray(blob)
        mutated[pos] ^= 0xFF
        _decode_cleanly(codec, bytes(mutated))


def test_qrank_dataset_through_writer_reader_and_verify(tmp_path):
    """A table built from the first window's ids, shards written, read back and verified: the
    decoded targets pass the writer's own checks (sorted, mass <= 1) and keep every id."""
    from kdcache.formats.manifest import DatasetHeader
    from kdcache.formats.packing import default_valid
    from kdcache.formats.reader import open_dataset
    from kdcache.formats.verify import verify_dataset
    from kdcache.formats.window import WindowRecord
    from kdcache.formats.writer import DatasetWriter, prepare_codec

    vocab, k, n = 70_000, 16, 200
    header = DatasetHeader(
        kind="topk", k=k, vocab_size=vocab, codec="qrank", codec_params={},
        packing={"window": n, "mode": "causal", "bos_id": 1, "eos_id": 2, "seed": 0},
        teacher={"name": "synthetic", "config_hash": "x", "tokenizer_hash": "y"})
    windows = []
    for w in range(3):
        ids, lp = synthetic_topk(n, k, vocab, seed=w)
        # half the rows with top-k mass right at 1 (no tail): rounding must not push it over
        full = lp[: n // 2].astype(np.float64)
        full -= np.logaddexp.reduce(full, axis=1, keepdims=True) - np.log1p(-1e-6)
        lp[: n // 2] = full.astype(np.float32)
        valid = default_valid(n, np.array([0, n]), "causal")
        ids[~valid], lp[~valid] = -1, -np.inf
        windows.append(WindowRecord(window_index=w, tokens=np.arange(n) % vocab,
                                    doc_offsets=np.array([0, n]), valid=valid, ids=ids,
                                    values=lp))
    codec = prepare_codec(header, sample_ids=windows[0].ids[windows[0].valid])
    assert codec.table is not None
    with DatasetWriter(tmp_path / "ds", header, codec, windows_per_shard=2) as writer:
        for rec in windows:
            writer.add(rec)
    ds = open_dataset(tmp_path / "ds")
    assert ds.manifest["codec"]["table"]["bytes"] == len(codec.table)
    for w, rec in enumerate(windows):
        got = ds[w]
        np.testing.assert_array_equal(np.sort(got.ids.numpy()[rec.valid], axis=1),
                                      np.sort(rec.ids[rec.valid], axis=1))
    report = verify_dataset(tmp_path / "ds")
    assert report.ok, report.problems


@pytest.mark.parametrize("units", [50, 250, 900])
def test_rate_control_kernel_matches_the_numpy_formula(units):
    """qrank_topk.row_kl (the rate control's inner loop) against the plain numpy quantise ->
    decode -> renormalise -> KL it replaces."""
    from kdcache.formats.codecs import qrank_topk

    rng = np.random.default_rng(units)
    m, k = 300, 24
    values = -np.sort(rng.gamma(1.0, 3.0, size=(m, k)), axis=1).astype(np.float32)
    values[:, 0] = -rng.random(m).astype(np.float32) * 0.1  # each row's top first
    top = values.max(axis=1)
    p = values.astype(np.float64)
    p -= p.max(axis=1, keepdims=True)
    p -= np.log(np.exp(p).sum(axis=1, keepdims=True))
    rel = np.minimum(values - top[:, None], 0.0).astype(np.float64)
    half_exp = np.exp(rel / 2.0)
    quantizer = LogProbQuantizer(step_max=1.0, sqrt_step=units * 1e-4)
    levels = quantizer.levels()
    codes = quantizer.encode(rel, half_exp)
    codes[:, 0] = 0
    q = levels[codes].astype(np.float64)
    q -= np.log(np.exp(q).sum(axis=1, keepdims=True))
    expected = float((np.exp(p) * (p - q)).sum(axis=1).mean())
    rows = np.empty(m)
    qrank_topk.row_kl(p, np.exp(p), rel, half_exp, quantizer._y_top, quantizer.threshold,
                      quantizer.sqrt_step, quantizer.step_max, levels,
                      qrank_topk.exp_shifted_levels(levels), rows)
    got = qrank_topk.mean_in_order(rows)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15) and expected > 0
