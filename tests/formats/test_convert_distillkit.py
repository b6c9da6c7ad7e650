"""`kdcache convert --from distillkit`: a DistillKit-format sample written from the layout
(tests/formats/distillkit_sample.py) becomes a verified kdcache dataset whose targets are the
DistillKit-decoded ones (exactly with the raw codec, within qrank's measured loss otherwise)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kdcache.cli import main as cli_main
from kdcache.formats.convert import distillkit
from kdcache.formats.reader import open_dataset
from kdcache.formats.synthetic import synthetic_targets
from kdcache.formats.verify import verify_dataset
from tests.formats import distillkit_sample as dks

VOCAB = 4000
CONFIGS = {
    # polynomial tail + two residual bins (one of 1-bit elements), bf16 exact values, no deltas
    "poly": {"d": VOCAB, "k": 16, "exact_k": 4, "exact_dtype": "bfloat16",
             "polynomial_terms": [0, 1, "sqrt"], "term_dtype": "float32",
             "residual_bins": [{"scale_dtype": "float16", "element_bits": 4, "num_elements": 6},
                               {"scale_dtype": "float32", "element_bits": 1,
                                "num_elements": 3}],
             "delta_encoding": False, "error_diffusion": False, "normalize_t": False},
    # delta encoding, float32 exact values, one 8-bit bin over the whole tail, normalised t
    "delta": {"d": VOCAB, "k": 12, "exact_k": 2, "exact_dtype": "float32",
              "polynomial_terms": [0, 2], "term_dtype": "float32",
              "residual_bins": [{"scale_dtype": "bfloat16", "element_bits": 8,
                                 "num_elements": 10}],
              "delta_encoding": True, "error_diffusion": False, "normalize_t": True},
}


def _samples(k: int, n_samples: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_samples):
        n = int(rng.integers(20, 90))
        ids, lps = synthetic_targets(rng, n - 1, VOCAB, k)
        out.append((rng.integers(0, VOCAB, size=n), ids, lps))
    return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def sample(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    folder = str(tmp_path_factory.mktemp(f"dk-{request.param}"))
    samples = _samples(cfg["k"])
    dks.write_sample(folder, cfg, samples)
    return folder, cfg, samples


def test_decoder_matches_the_layout(sample):
    folder, cfg, samples = sample
    parsed = distillkit.read_config(os.path.join(folder, "compression_config.yaml"))
    for _, ids, lps in samples:
        rows = dks.encode_rows(lps, cfg)
        got = distillkit.decode_logprobs(rows, parsed)
        want = dks.reference_decode(rows, cfg)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
        if not cfg["delta_encoding"]:  # the exact values are the compressed ones, rounded
            np.testing.assert_allclose(got[:, :cfg["exact_k"]], lps[:, :cfg["exact_k"]],
                                       rtol=1e-2, atol=1e-3)
        packed = dks.pack_bits(ids, dks.index_bits(cfg["d"]))
        np.testing.assert_array_equal(
            distillkit.unpack_bits(packed, parsed.index_bits, cfg["k"]), ids)


@pytest.mark.parametrize("codec", ["raw", "qrank"])
def test_convert_to_kdcache(sample, tmp_path, codec):
    folder, cfg, samples = sample
    out = str(tmp_path / "ds")
    summary = distillkit.convert_distillkit(folder, out, codec=codec, windows_per_shard=2)
    assert verify_dataset(out).ok
    ds = open_dataset(out)
    assert ds.k == cfg["k"] and ds.vocab_size == VOCAB and ds.packing["mode"] == "document"
    assert summary["documents"] == len(samples)
    # every sample is one document, in order; its targets are the DistillKit-decoded rows,
    # repaired as documented (sorted, <= 0, mass <= 1)
    docs = {}
    for w in ds.iter_windows():
        offsets = w.doc_offsets.numpy()
        for d, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            docs[int(w.doc_ids[d])] = (w.tokens.numpy()[a:b], w.valid.numpy()[a:b],
                                       w.ids.numpy()[a:b], w.logprobs.numpy()[a:b])
    assert sorted(docs) == list(range(len(samples)))
    kl_sum = rows = 0.0
    for doc_id, (tokens, ids, lps) in enumerate(samples):
        t, valid, got_ids, got_lp = docs[doc_id]
        np.testing.assert_array_equal(t, tokens)
        assert valid[:-1].all() and not valid[-1]
        want = dks.reference_decode(dks.encode_rows(lps, cfg), cfg)
        order = np.argsort(-want, axis=1, kind="stable")
        want_ids = np.take_along_axis(ids, order, axis=1)
        want_lp = np.minimum(np.take_along_axis(want, order, axis=1), 0)
        mass = np.exp(want_lp).sum(axis=1, keepdims=True)
        want_lp = want_lp - np.log(np.maximum(mass, 1.0))
        g_ids, g_lp = got_ids[:-1], got_lp[:-1]
        if codec == "raw":
            np.testing.assert_array_equal(np.sort(g_ids, 1), np.sort(want_ids, 1))
            np.testing.assert_allclose(np.sort(g_lp, 1), np.sort(want_lp, 1), atol=1e-5)
        p = np.exp(want_lp.astype(np.float64))
        p /= p.sum(1, keepdims=True)
        q = np.zeros_like(p)
        for r in range(p.shape[0]):  # the converted row's value for each original id
            lookup = dict(zip(g_ids[r].tolist(), g_lp[r].tolist()))
            q[r] = np.exp([lookup[i] for i in want_ids[r].tolist()])
        q /= q.sum(1, keepdims=True)
        kl_sum += float((p * np.log(p / q)).sum())
        rows += p.shape[0]
    assert kl_sum / rows < (1e-9 if codec == "raw" else 2e-3)
    convert_stats = ds.manifest["stats"]["convert"]
    assert convert_stats["rows_changed"]["rows"] == sum(len(s[1]) for s in samples)


def test_convert_cli_and_refusals(sample, tmp_path, capsys):
    folder, cfg, _ = sample
    out = str(tmp_path / "cli")
    assert cli_main(["convert", folder, "--from", "distillkit", "--out", out, "--codec", "raw",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "distillkit"
    assert cli_main(["convert", folder, "--from", "distillkit", "--out", str(tmp_path / "w"),
                     "--window", "8"]) == 2
    assert "shorter than the longest sample" in capsys.readouterr().err
    bad = tmp_path / "badcfg"
    bad.mkdir()
    for name in os.listdir(folder):
        if name.endswith(".parquet"):
            os.link(os.path.join(folder, name), bad / name)
    (bad / "compression_config.yaml").write_text(json.dumps(dict(cfg, d=VOCAB * 4)))
    assert cli_main(["convert", str(bad), "--from", "distillkit", "--out",
                     str(tmp_path / "b")]) == 2
    assert "compression config implies" in capsys.readouterr().err
    assert not (tmp_path / "b" / "manifest.json").exists()
