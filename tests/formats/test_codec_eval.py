"""`kdcache codec eval`: the JSON it prints on a small top-k file, and its errors on bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdcache import cli
from kdcache.formats.codec_eval import TopkFileError, evaluate, load_topk_npz
from tests.formats.test_codecs import synthetic_topk

REQUIRED = ("codec", "k", "vocab_size", "tokens", "bytes_per_token", "bytes_per_entry",
            "kl_mean", "kl_max", "decode_tokens_per_s", "decode_vs_zstd")


@pytest.fixture(scope="module")
def topk_file(tmp_path_factory):
    ids, lp = synthetic_topk(600, 32, 30_000, seed=4)
    path = tmp_path_factory.mktemp("codec_eval") / "topk.npz"
    np.savez(path, ids=ids.astype(np.int32), logprobs=lp, vocab_size=np.int64(30_000))
    return path


@pytest.fixture(autouse=True)
def _only_codec_commands(monkeypatch):
    """The real CLI entry point, with only this component's subcommands registered (other
    components' modules may import torch, which is slow to load and not under test here)."""
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("kdcache.formats.codec_commands",))


def run_cli(capsys, *argv):
    code = cli.main(["codec", "eval", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_json_line(topk_file, capsys):
    code, out, _ = run_cli(capsys, "--topk", topk_file, "--codec", "qrank", "--k", 16,
                           "--window", 256, "--table-tokens", 200, "--repeats", 1, "--json")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in REQUIRED:
        assert key in result, key
    assert result["codec"] == "qrank" and result["k"] == 16 and result["tokens"] == 600
    assert result["vocab_size"] == 30_000
    assert result["table_bytes"] > 0 and "first 200 tokens" in result["table_fit"]
    assert result["bytes_per_entry"] == pytest.approx(result["bytes_per_token"] / 16)
    assert 0 <= result["kl_mean"] <= result["kl_max"] < 5e-3
    assert result["decode_tokens_per_s"] > 0 and result["decode_vs_zstd"] > 0


def test_eval_raw_is_exact_and_default_codec_is_smaller(topk_file, capsys):
    _, out, _ = run_cli(capsys, "--topk", topk_file, "--codec", "raw", "--repeats", 1, "--json")
    raw = json.loads(out)
    assert raw["kl_mean"] == 0.0 and raw["kl_max"] == 0.0 and raw["k"] == 32
    _, out, _ = run_cli(capsys, "--topk", topk_file, "--repeats", 1, "--json")
    default = json.loads(out)
    assert default["codec"] == "qrank"
    assert default["bytes_per_entry"] < raw["bytes_per_entry"] / 2


def test_eval_human_table(topk_file, capsys):
    code, out, _ = run_cli(capsys, "--topk", topk_file, "--k", 8, "--repeats", 1,
                           "--table-tokens", 0)
    assert code == 0
    assert "bytes / entry" in out and "KL mean / max" in out and "tokens/s" in out


def test_evaluate_counts_the_table(topk_file):
    topk = load_topk_npz(topk_file, k=8)
    with_table = evaluate(topk, "qrank", window=300, table_tokens=300, repeats=1)
    without = evaluate(topk, "qrank", window=300, table_tokens=0, repeats=1)
    assert without["table_bytes"] == 0 and without["table_fit"] == "none"
    assert with_table["bytes_per_token"] == pytest.approx(
        with_table["stream_bytes_per_entry"] * 8 + with_table["table_bytes"] / 600)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def _good_arrays():
    ids, lp = synthetic_topk(20, 8, 1000, seed=2)
    return dict(ids=ids.astype(np.int32), logprobs=lp, vocab_size=np.int64(1000))


def _bad_files():
    good = _good_arrays()
    unsorted = good["logprobs"].copy()
    unsorted[3, [0, 5]] = unsorted[3, [5, 0]]
    nan = good["logprobs"].copy()
    nan[4, 2] = np.nan
    big = good["ids"].copy()
    big[5, 1] = 1000
    dup = good["ids"].copy()
    dup[6, 1] = dup[6, 0]
    return {
        "missing array": ({k: v for k, v in good.items() if k != "logprobs"}, "missing array"),
        "float ids": ({**good, "ids": good["ids"].astype(np.float32)}, "integer"),
        "int logprobs": ({**good, "logprobs": good["ids"]}, "float"),
        "shape mismatch": ({**good, "logprobs": good["logprobs"][:, :4]}, "matching ids"),
        "1-D ids": ({**good, "ids": good["ids"][:, 0]}, "integer"),
        "vocab array": ({**good, "vocab_size": np.array([1000, 2])}, "vocab_size"),
        "unsorted": ({**good, "logprobs": unsorted}, "row 3.*descending"),
        "nan": ({**good, "logprobs": nan}, "row 4.*NaN"),
        "id >= vocab": ({**good, "ids": big}, r"row 5.*out of range \[0, 1000\)"),
        "duplicate id": ({**good, "ids": dup}, "row 6.*twice"),
        "empty": ({**good, "ids": good["ids"][:0], "logprobs": good["logprobs"][:0]},
                  "no targets"),
    }


@pytest.mark.parametrize("case", sorted(_bad_files()))
def test_bad_files_raise_clear_errors(tmp_path, case):
    arrays, pattern = _bad_files()[case]
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TopkFileError, match=pattern) as info:
        load_topk_npz(path)
    assert str(path) in str(info.value)


def test_k_larger_than_file_and_unreadable_files(tmp_path, capsys):
    path = _write(tmp_path / "ok.npz", **_good_arrays())
    with pytest.raises(TopkFileError, match="k=9 is not in"):
        load_topk_npz(path, k=9)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(TopkFileError, match="not a readable npz"):
        load_topk_npz(tmp_path / "junk.npz")
    with pytest.raises(TopkFileError, match="no such file"):
        load_topk_npz(tmp_path / "absent.npz")
    # Through the CLI: exit code 2, the file and the problem on stderr, no traceback.
    code, out, err = run_cli(capsys, "--topk", path, "--k", 99, "--json")
    assert code == 2 and out == ""
    assert str(path) in err and "k=99" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "--topk", path, "--codec", "nope", "--repeats", 1)
    assert code == 2 and "unknown codec" in err


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    good = _good_arrays()
    path = tmp_path / "pickled.npz"
    np.savez(path, ids=good["ids"], logprobs=good["logprobs"],
             vocab_size=np.array({"v": 1000}, dtype=object))
    with pytest.raises(TopkFileError, match="not a readable npz"):
        load_topk_npz(path)
