"""`kdcache convert --from megatron`: logits-saver tars written as Megatron-LM writes them
(tar of _meta.json + {iteration}.pt.zst torch.save payloads, 17-bit ids split into uint16 + bool,
dp ranks in separate tars) become a kdcache dataset with each sample's exact targets; payloads
are read without unpickling."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import zstandard

from kdcache.cli import main as cli_main
from kdcache.formats.convert import megatron, torch_payload
from kdcache.formats.reader import open_dataset
from kdcache.formats.verify import verify_dataset

VOCAB, SEQ, K, MBS, DP, MICRO, ITERS = 70_000, 16, 8, 2, 2, 2, 3
GLOBAL = MBS * DP * MICRO


def _sample_targets(rng, n_samples):
    logits = torch.from_numpy(rng.normal(size=(n_samples, SEQ, VOCAB)).astype(np.float32) * 3)
    lp = torch.log_softmax(logits, dim=-1)
    values, ids = torch.topk(lp, K, dim=-1)
    return ids, values.half()  # Megatron's default save_dtype fp16


def _write_tars(folder, ids, values, *, p=None, cp=0):
    os.makedirs(folder, exist_ok=True)
    meta = json.dumps({"hash": "abc", "identifiers": {"seed": 1},
                       "saver": {"k": K, "p": p, "min_k": 1, "save_dtype": "fp16"}}).encode()
    cctx = zstandard.ZstdCompressor(level=3)
    for r in range(DP):
        for last, iters in ((1, [0, 1]), (2, [2])):
            path = os.path.join(folder, f"cp{cp}_dp{r}__{last}.tar")
            with tarfile.open(path, "w") as tar:
                info = tarfile.TarInfo("_meta.json")
                info.size = len(meta)
                tar.addfile(info, io.BytesIO(meta))
                for it in iters:
                    vals, lows, highs = [], [], []
                    for m in range(MICRO):
                        s0 = it * GLOBAL + m * MBS * DP + r * MBS
                        sel = ids[s0:s0 + MBS].transpose(0, 1)  # (seq, batch, K)
                        vals.append(values[s0:s0 + MBS].transpose(0, 1).contiguous())
                        lows.append((sel & 0xFFFF).to(torch.uint16).contiguous())
                        highs.append((sel >> 16).to(torch.bool).contiguous())
                    buf = io.BytesIO()
                    torch.save({"values": vals, "indices_low": lows, "bit_17": highs}, buf)
                    data = cctx.compress(buf.getvalue())
                    info = tarfile.TarInfo(f"{it}.pt.zst")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = ITERS * GLOBAL
    ids, values = _sample_targets(rng, n)
    root = tmp_path_factory.mktemp("megatron")
    folder = str(root / "logits")
    _write_tars(folder, ids, values)
    tokens = rng.integers(0, VOCAB, size=(n, SEQ + 1))
    np.save(root / "tokens.npy", tokens)
    return folder, str(root / "tokens.npy"), tokens, ids.numpy(), values.float().numpy()


def test_convert_megatron_exact_with_raw(saved, tmp_path):
    folder, tokens_path, tokens, ids, values = saved
    out = str(tmp_path / "ds")
    summary = megatron.convert_megatron(folder, out, tokens=tokens_path, vocab_size=VOCAB,
                                        codec="raw", windows_per_shard=4)
    assert verify_dataset(out).ok
    ds = open_dataset(out)
    assert len(ds) == ITERS * GLOBAL == summary["windows"]
    assert ds.packing["mode"] == "causal" and ds.k == K
    assert (ids >= 65536).any()  # the 17th bit is exercised
    for s in range(len(ds)):
        w = ds[s]
        np.testing.assert_array_equal(w.tokens.numpy(), tokens[s])
        assert w.valid.numpy()[:SEQ].all() and not w.valid.numpy()[SEQ]
        np.testing.assert_array_equal(w.ids.numpy()[:SEQ], ids[s])
        np.testing.assert_array_equal(w.logprobs.numpy()[:SEQ], values[s])
        assert int(w.doc_ids[0]) == s


def test_convert_megatron_cli_with_default_codec(saved, tmp_path, capsys):
    folder, tokens_path, _, ids, values = saved
    out = str(tmp_path / "q")
    assert cli_main(["convert", folder, "--from", "megatron", "--out", out, "--tokens",
                     tokens_path, "--vocab-size", str(VOCAB), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == ITERS * GLOBAL
    w = open_dataset(out)[5]
    np.testing.assert_array_equal(np.sort(w.ids.numpy()[:SEQ], 1), np.sort(ids[5], 1))


def test_megatron_refusals(saved, tmp_path, capsys):
    folder, tokens_path, tokens, ids, values = saved
    topp = str(tmp_path / "topp")
    _write_tars(topp, torch.from_numpy(ids), torch.from_numpy(values).half(), p=0.9)
    with pytest.raises(megatron.MegatronFormatError, match="top-p"):
        megatron.convert_megatron(topp, str(tmp_path / "x"), tokens=tokens_path,
                                  vocab_size=VOCAB)
    cp = str(tmp_path / "cp")
    _write_tars(cp, torch.from_numpy(ids), torch.from_numpy(values).half(), cp=1)
    with pytest.raises(megatron.MegatronFormatError, match="context-parallel"):
        megatron.convert_megatron(cp, str(tmp_path / "x"), tokens=tokens_path, vocab_size=VOCAB)
    short = tmp_path / "short.npy"
    np.save(short, tokens[:5])
    with pytest.raises(megatron.MegatronFormatError, match="tokens array has 5"):
        megatron.convert_megatron(folder, str(tmp_path / "x"), tokens=str(short),
                                  vocab_size=VOCAB)
    assert cli_main(["convert", folder, "--from", "megatron", "--out", str(tmp_path / "y")]) == 2
    assert "--tokens" in capsys.readouterr().err


def test_torch_payload_reader_never_unpickles():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    torch.save({"values": [Evil()]}, buf)
    with pytest.raises(torch_payload.TorchPayloadError, match="refusing pickle global"):
        torch_payload.load(buf.getvalue(), where="evil")
    buf = io.BytesIO()
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1:3]  # a strided view
    torch.save({"a": [t, t.bfloat16()]}, buf)
    got = torch_payload.load(buf.getvalue(), where="ok")["a"]
    np.testing.assert_array_equal(got[0].array, t.numpy())
    np.testing.assert_array_equal(got[1].as_float32(), t.bfloat16().float().numpy())
