"""Code and FORMAT.md as one truth: the golden vectors (tests/data/golden, FORMAT.md section 12).

- kdcache's writer, fed the stored inputs, reproduces the stored datasets: stream by stream
  always, byte for byte with the zstd/pyarrow versions the vectors were written with;
- kdcache's reader and `verify` give the stored decoded arrays;
- a naive decoder written from FORMAT.md alone (naive_decoder.py) gives them too, bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import zstandard

from tests.formats import golden_cases as gc
from tests.formats import naive_decoder as nd

pytestmark = pytest.mark.timeout(300)

CASES = json.loads((gc.GOLDEN / "cases.json").read_text())
NAMES = [c["name"] for c in CASES["cases"]]


def _case(name: str) -> dict:
    return next(c for c in CASES["cases"] if c["name"] == name)


def _decoded(name: str) -> dict[str, np.ndarray]:
    with np.load(gc.GOLDEN / name / "decoded.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape, dtype and bits (-inf and signed zeros included)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory) -> dict:
    """Every golden case written again by today's writer from the stored input."""
    out = {}
    for name in NAMES:
        root = tmp_path_factory.mktemp("golden") / name
        gc.write_case(root, _case(name), gc.load_inputs(gc.GOLDEN / name / "input.npz"))
        out[name] = root
    return out


def _dataset_files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for d in gc.DATASET_DIRS if (root / d).exists()
                  for p in (root / d).rglob("*") if p.is_file()) + list(gc.DATASET_FILES)


def _manifest(root, drop_sizes: bool = False) -> dict:
    m = json.loads((root / "manifest.json").read_text())
    for key in gc.VOLATILE_MANIFEST_FIELDS:
        m.pop(key)
    if drop_sizes:  # compressed sizes and hashes depend on the zstd build
        for entry in m["shards"]:
            for key in ("bytes", "target_bytes", "xxh3"):
                entry.pop(key)
        for key in ("bytes", "target_bytes", "target_bytes_per_token"):
            m["totals"].pop(key)
        if m["codec"]["table"]:
            m["codec"]["table"].pop("bytes"), m["codec"]["table"].pop("xxh3")
    return m


def _canonical_blob(blob: bytes, codec: str) -> list:
    """A targets blob with its zstd frames decompressed: what the writer decided, independent
    of the zstd build that compressed it."""
    if codec == "raw":
        return [zstandard.ZstdDecompressor().decompress(blob)]
    out = [blob[:25]]
    n_streams = blob[24]
    pos = 25 + 9 * n_streams
    for i in range(n_streams):
        stored = int.from_bytes(blob[25 + 9 * i:29 + 9 * i], "little")
        meta = blob[29 + 9 * i:34 + 9 * i]  # raw length, zstd flag
        data = blob[pos:pos + stored]
        pos += stored
        out += [meta, zstandard.ZstdDecompressor().decompress(data) if meta[4] else data]
    return out


def _canonical_shard(path, codec: str) -> list:
    reader = ipc.open_file(pa.memory_map(str(path)))
    rows = []
    for b in range(reader.num_record_batches):
        row = reader.get_batch(b).to_pylist()[0]
        row["targets"] = _canonical_blob(row["targets"], codec)
        rows.append(row)
    return [reader.schema, rows]


@pytest.mark.parametrize("name", NAMES)
def test_writer_reproduces_golden_streams(rewritten, name):
    root, gold = rewritten[name], gc.GOLDEN / name
    assert _dataset_files(root) == _dataset_files(gold)
    assert _manifest(root, drop_sizes=True) == _manifest(gold, drop_sizes=True)
    for rel in _dataset_files(gold):
        if rel.endswith(".arrow"):
            got = _canonical_shard(root / rel, _case(name)["codec"])
            want = _canonical_shard(gold / rel, _case(name)["codec"])
            assert got[0].equals(want[0], check_metadata=True)
            assert got[1] == want[1], f"{name}/{rel}: the writer's streams changed"
        elif rel.endswith("table.bin"):
            got, want = (root / rel).read_bytes(), (gold / rel).read_bytes()
            assert got[:13] == want[:13]
            assert zstandard.ZstdDecompressor().decompress(got[17:]) == \
                zstandard.ZstdDecompressor().decompress(want[17:])


@pytest.mark.parametrize("name", NAMES)
def test_writer_reproduces_golden_bytes(rewritten, name):
    if gc.library_versions() != CASES["written_with"]:
        pytest.skip(f"zstd/pyarrow builds differ from the vectors' {CASES['written_with']}: "
                    "compressed bytes may differ; test_writer_reproduces_golden_streams holds")
    root, gold = rewritten[name], gc.GOLDEN / name
    assert _manifest(root) == _manifest(gold)
    for rel in _dataset_files(gold):
        if rel != "manifest.json":
            assert (root / rel).read_bytes() == (gold / rel).read_bytes(), f"{name}/{rel}"


@pytest.mark.parametrize("name", NAMES)
def test_kdcache_reader_gives_golden_arrays(name):
    from kdcache.formats.verify import verify_dataset

    want = _decoded(name)
    got = gc.decoded_arrays(gc.GOLDEN / name)
    assert sorted(got) == sorted(want)
    for key in want:
        assert _same_bits(got[key].astype(want[key].dtype), want[key]), f"{name}: {key}"
    report = verify_dataset(gc.GOLDEN / name)
    assert report.ok, report.problems


@pytest.mark.parametrize("name", NAMES)
def test_naive_decoder_from_format_md_gives_golden_arrays(name):
    case = _case(name)
    want = _decoded(name)
    windows, _ = nd.read_dataset(gc.GOLDEN / name)
    assert len(windows) == len([k for k in want if k.endswith("_ids")])
    for i, w in enumerate(windows):
        assert np.array_equal(w["tokens"], want[f"w{i}_tokens"])
        assert np.array_equal(w["valid"], want[f"w{i}_valid"])
        assert np.array_equal(w["doc_offsets"], want[f"w{i}_doc_offsets"])
        assert _same_bits(w["ids"], want[f"w{i}_ids"].astype(np.int32)), f"{name}: window {i} ids"
        assert _same_bits(w["values"], want[f"w{i}_values"]), f"{name}: window {i} values"
        v = w["valid"]
        nd.check_values(case["kind"], w["ids"][v], w["values"][v], case["vocab_size"])


def test_naive_decoder_reads_a_1_0_dataset():
    """Format 1.0.0 (before packing.targets) decodes by the same text."""
    legacy = gc.GOLDEN.parent / "legacy-1.0" / "qrank-topk"
    windows, _ = nd.read_dataset(legacy)
    with np.load(legacy / "decoded.npz", allow_pickle=False) as want:
        assert len(windows) == len([k for k in want.files if k.endswith("_ids")])
        for i, w in enumerate(windows):
            assert _same_bits(w["ids"], want[f"w{i}_ids"].astype(np.int32))
            assert _same_bits(w["values"], want[f"w{i}_values"])


def test_golden_vectors_reach_every_branch():
    """The vectors exercise what a reader could get wrong, not only the common path."""
    total = nd.Coverage()
    for name in NAMES:
        _, cov = nd.read_dataset(gc.GOLDEN / name)
        for key, value in vars(cov).items():
            setattr(total, key, getattr(total, key) + value)
    assert all(v > 0 for v in vars(total).values()), vars(total)
    cases = {c["codec"] + "/" + c["kind"] for c in CASES["cases"]}
    assert cases == {"qrank/topk", "qrank/sampled", "raw/topk", "raw/sampled"}


@pytest.mark.parametrize("name", ["raw-topk", "raw-sampled", "qrank-sampled-counts",
                                  "qrank-sampled-float"])
def test_lossless_golden_cases_decode_to_their_input(name):
    inputs = gc.load_inputs(gc.GOLDEN / name / "input.npz")
    want = _decoded(name)
    for i, w in enumerate(inputs):
        v = w["valid"]
        assert np.array_equal(want[f"w{i}_ids"][v], w["ids"][v])
        assert _same_bits(want[f"w{i}_values"][v], w["values"][v].astype(np.float32))


def test_naive_decoder_accepts_values_at_the_tolerances():
    """The writer accepts log-probs up to +1e-4, ascents up to 1e-5 and mass up to 1 + 1e-3
    (FORMAT.md section 3): the raw golden case stores such values, which the exact rules would
    refuse, and a reader following the text accepts them."""
    windows, _ = nd.read_dataset(gc.GOLDEN / "raw-topk")
    values = np.concatenate([w["values"][w["valid"]] for w in windows])
    ids = np.concatenate([w["ids"][w["valid"]] for w in windows])
    assert (values > 0).any()
    assert (np.diff(values, axis=1) > 0).any()
    assert (np.exp(values.astype(np.float64)).sum(axis=1) > 1).any()
    nd.check_values("topk", ids, values, 256)


LADDER = (100, 125, 150, 175, 200, 225, 250, 275, 300, 350, 400, 500)


@pytest.mark.parametrize("step_max", [0.5, 1.0, 2.0])
def test_value_grid_from_format_md_equals_kdcache_tables(step_max):
    """FORMAT.md 7.4's float64 recipe (numpy, and the C library's exp/log through `math`) gives
    kdcache's decode table exactly for every step of the encoder's ladder; float32 does not."""
    import math

    from kdcache.formats.codecs.quantize import LogProbQuantizer

    float32_differs = 0
    for u in (u for u in LADDER if u * 1e-4 < step_max):
        want = LogProbQuantizer(step_max=step_max, sqrt_step=u * 1e-4).levels()
        assert _same_bits(nd.value_table(u, step_max), want), u
        a = u * 1e-4
        t = 2 * math.log(a / step_max)
        h = math.exp(t / 2)
        y_top = 2 * (1 - h) / a
        libm = [min(2 * math.log(max((y_top - c) * a / 2 + h, 1e-300)) if y_top - c >= 0
                    else t + (y_top - c) * step_max, 0.0) for c in range(0, 65536, 7)]
        assert _same_bits(np.array(libm, dtype=np.float32), want[::7]), u
        f = np.float32
        y = (f(y_top) - np.arange(65536, dtype=np.float32)).astype(np.float32)
        in32 = np.where(y >= 0, f(2) * np.log(np.maximum(y * f(a) / f(2) + f(h), f(1e-30))),
                        f(t) + y * f(step_max))
        float32_differs += int((np.minimum(in32, 0).astype(np.float32) != want).sum())
    assert float32_differs > 10_000
