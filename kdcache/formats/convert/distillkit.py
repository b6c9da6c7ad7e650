"""DistillKit's Parquet logit datasets -> kdcache datasets.

The layout (docs/convert.md gives it in full; read from DistillKit's `sample_logits_vllm.py` and
`compression/` sources, not run): Parquet files (`data_0.parquet`, ...) with one row per sample:

- `input_ids` list<uint64>: the sample's n tokens.
- `bytepacked_indices` list<list<uint8>>: m rows (m = n - 1: vLLM gives the first token no
  prompt log-prob, so row j is the teacher's distribution for token j+1), each k vocabulary ids
  of b = ceil(log2(d)) bits (computed in float32), big-endian bit order, MSB first, the row
  zero-padded to whole bytes.
- `compressed_logprobs` list<list<uint8>>: m rows, each the k log-probs, sorted descending,
  packed per the dataset's `compression_config.yaml` (DistributionQuantizationConfig): exact_k
  values of exact_dtype; then one coefficient of term_dtype per polynomial term; then per residual
  bin its scale (scale_dtype) and num_elements integers of element_bits bits (MSB first, the bin
  zero-padded to whole bytes). All floats little-endian.

Decoding (as DistillKit's decompressor does it): residual q -> (q - 2^(bits-1)) * scale (for
one-bit elements (2q - 1) * scale), in float32 or the scale's wider dtype; residuals after the
bins' elements are 0; the residuals are cast to exact_dtype; the tail is sum_i coeff_i * x_i(t)
with t = 0..k-exact_k-1 (or linspace(0, 1) with normalize_t) and x_i = t^i, sqrt(t) or exp(t), in
term_dtype, plus the residuals; with delta_encoding the values are a float32 cumulative sum cast
to exact_dtype.

What the conversion changes (lossy, counted in the output's stats): DistillKit's approximated
tails can overshoot 0 or rise; kdcache stores full-vocabulary log-probs <= 0, descending, mass
<= 1, so such rows are clamped, sorted and renormalised, and rows without k distinct ids and
finite values are kept without a target. Then the kdcache codec encodes (qrank: a further,
measured quantisation; raw: exact float32).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from kdcache.errors import FormatError, KdcacheError
from kdcache.formats import storage
from kdcache.formats.codecs import default_codec
from kdcache.formats.convert.common import (Document, RepairCounts, conversion_summary,
                                           pack_documents, repair_topk_rows, token_bar)
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.writer import DatasetWriter

CONFIG_NAME = "compression_config.yaml"
_FLOAT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_SPECIAL_TERMS = ("sqrt", "exp")


class DistillKitFormatError(FormatError):
    """A DistillKit dataset or compression config does not follow DistillKit's layout."""


@dataclass
class ResidualBin:
    scale_dtype: str
    element_bits: int
    num_elements: int

    @property
    def nbytes(self) -> int:
        return _FLOAT_BYTES[self.scale_dtype] + (self.num_elements * self.element_bits + 7) // 8


@dataclass
class CompressionConfig:
    """DistillKit's DistributionQuantizationConfig, read from compression_config.yaml."""

    d: int
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: list[Any] | None = None
    term_dtype: str = "float32"
    residual_bins: list[ResidualBin] | None = None
    delta_encoding: bool = True
    error_diffusion: bool = False  # encoder-side only: decoding is the same
    normalize_t: bool = False

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "CompressionConfig":
        if not isinstance(raw, dict):
            raise DistillKitFormatError(f"{where}: not a mapping")
        if "legacy" in raw or "polynomial_degree" in raw:
            raise DistillKitFormatError(
                f"{where}: a legacy_logit_compression config (packed_indices/exact_values/"
                "coeffs columns); only the DistributionQuantizationConfig format is converted")
        try:
            bins = [ResidualBin(scale_dtype=str(b["scale_dtype"]),
                                element_bits=int(b["element_bits"]),
                                num_elements=int(b["num_elements"]))
                    for b in raw.get("residual_bins") or []]
            cfg = cls(d=int(raw["d"]), k=int(raw["k"]), exact_k=int(raw["exact_k"]),
                      exact_dtype=str(raw.get("exact_dtype", "float32")),
                      polynomial_terms=list(raw["polynomial_terms"])
                      if raw.get("polynomial_terms") else None,
                      term_dtype=str(raw.get("term_dtype", "float32")), residual_bins=bins,
                      delta_encoding=bool(raw.get("delta_encoding", True)),
                      error_diffusion=bool(raw.get("error_diffusion", False)),
                      normalize_t=bool(raw.get("normalize_t", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise DistillKitFormatError(f"{where}: missing or invalid field: {exc}") from None
        cfg._check(where)
        return cfg

    def _check(self, where: str) -> None:
        problems = []
        if not 0 < self.k <= self.d or not 0 <= self.exact_k <= self.k:
            problems.append(f"need 0 < k <= d and 0 <= exact_k <= k (d={self.d}, k={self.k}, "
                            f"exact_k={self.exact_k})")
        for name, dtype in (("exact_dtype", self.exact_dtype), ("term_dtype", self.term_dtype),
                            *(("scale_dtype", b.scale_dtype) for b in self.residual_bins or [])):
            if dtype not in _FLOAT_BYTES:
                problems.append(f"{name} {dtype!r} is not one of {sorted(_FLOAT_BYTES)}")
        for t in self.polynomial_terms or []:
            if not (isinstance(t, int) and not isinstance(t, bool) and t >= 0) \
                    and t not in _SPECIAL_TERMS:
                problems.append(f"polynomial term {t!r} is not a power or one of {_SPECIAL_TERMS}")
        for b in self.residual_bins or []:
            if not 1 <= b.element_bits <= 64 or b.num_elements <= 0:
                problems.append(f"residual bin {b} needs 1..64 bits and elements > 0")
        if sum(b.num_elements for b in self.residual_bins or []) > self.k - self.exact_k:
            problems.append("residual bins hold more elements than k - exact_k")
        if problems:
            raise DistillKitFormatError(f"{where}: " + "; ".join(problems))

    @property
    def index_bits(self) -> int:
        """ceil(log2(d)), computed in float32 as DistillKit does (it matters only near powers of
        two, where float32 rounding decides)."""
        return int(np.ceil(np.log2(np.float32(self.d), dtype=np.float32)))

    @property
    def index_bytes(self) -> int:
        return (self.k * self.index_bits + 7) // 8

    @property
    def logprob_bytes(self) -> int:
        n = self.exact_k * _FLOAT_BYTES[self.exact_dtype]
        n += len(self.polynomial_terms or []) * _FLOAT_BYTES[self.term_dtype]
        return n + sum(b.nbytes for b in self.residual_bins or [])


def read_config(path: str) -> CompressionConfig:
    import yaml

    fs, p = storage.resolve(path)
    try:
        raw = yaml.safe_load(storage.read_bytes(fs, p))
    except yaml.YAMLError as exc:
        raise DistillKitFormatError(f"{path}: not valid YAML: {exc}") from None
    return CompressionConfig.from_dict(raw, where=path)


# --------------------------------------------------------------------------- bit unpacking

def unpack_bits(rows: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 [m, nbytes] -> int64 [m, count]: `count` big-endian `bits`-bit integers per row."""
    if count * bits > rows.shape[1] * 8:
        raise DistillKitFormatError(f"{count} values of {bits} bits need {count * bits} bits, "
                                    f"rows hold {rows.shape[1] * 8}")
    flat = np.unpackbits(rows, axis=1)[:, :count * bits].reshape(rows.shape[0], count, bits)
    if bits <= 63:
        weights = (np.int64(1) << np.arange(bits - 1, -1, -1, dtype=np.int64))
        return (flat.astype(np.int64) * weights).sum(axis=2)
    out = np.zeros((rows.shape[0], count), dtype=np.uint64)  # 64-bit elements: no sign bit
    for b in range(bits):
        out = (out << np.uint64(1)) | flat[:, :, b].astype(np.uint64)
    return out.view(np.int64)


# --------------------------------------------------------------------------- log-prob decoding

def _torch_dtype(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
            "float64": torch.float64}[name]


def _floats(raw: np.ndarray, dtype: str, count: int):
    """uint8 [m, count*size] (little-endian) -> torch tensor [m, count] of `dtype`."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(raw)).view(_torch_dtype(dtype)).reshape(
        raw.shape[0], count)


def decode_logprobs(rows: np.ndarray, cfg: CompressionConfig) -> np.ndarray:
    """uint8 [m, logprob_bytes] -> float32 [m, k], with DistillKit's arithmetic and dtypes."""
    import torch

    if rows.ndim != 2 or rows.shape[1] != cfg.logprob_bytes:
        raise DistillKitFormatError(f"compressed_logprobs rows hold {rows.shape[-1]} bytes, the "
                                    f"compression config implies {cfg.logprob_bytes}")
    m = rows.shape[0]
    out_dtype = _torch_dtype(cfg.exact_dtype)
    pos = 0
    size = _FLOAT_BYTES[cfg.exact_dtype]
    exact = _floats(rows[:, :cfg.exact_k * size], cfg.exact_dtype, cfg.exact_k)
    pos += cfg.exact_k * size
    terms = cfg.polynomial_terms or []
    coeffs = None
    if terms:
        tsize = _FLOAT_BYTES[cfg.term_dtype]
        coeffs = _floats(rows[:, pos:pos + len(terms) * tsize], cfg.term_dtype, len(terms))
        pos += len(terms) * tsize
    residuals = []
    for b in cfg.residual_bins or []:
        ssize = _FLOAT_BYTES[b.scale_dtype]
        scale = _floats(rows[:, pos:pos + ssize], b.scale_dtype, 1)
        pos += ssize
        nbytes = (b.num_elements * b.element_bits + 7) // 8
        q = torch.from_numpy(unpack_bits(rows[:, pos:pos + nbytes], b.element_bits,
                                         b.num_elements))
        pos += nbytes
        if b.element_bits == 1:
            residuals.append((q.to(torch.float32) * 2.0 - 1.0) * scale)
        else:
            residuals.append((q - 2 ** (b.element_bits - 1)).to(torch.float32) * scale)
    tail = cfg.k - cfg.exact_k
    if residuals:
        residual = torch.cat(residuals, dim=-1)
        if residual.shape[1] < tail:
            residual = torch.nn.functional.pad(residual, (0, tail - residual.shape[1]))
    else:
        residual = torch.zeros((m, tail), dtype=out_dtype)
    approx = residual.to(out_dtype)
    if coeffs is not None:
        tdtype = _torch_dtype(cfg.term_dtype)
        pts = (torch.linspace(0, 1, steps=tail, dtype=tdtype) if cfg.normalize_t
               else torch.arange(tail, dtype=tdtype))
        basis = torch.stack([pts ** t if isinstance(t, int) else getattr(torch, t)(pts)
                             for t in terms], dim=-1)
        approx = (basis.unsqueeze(0) * coeffs.unsqueeze(-2)).sum(dim=-1) + approx
    values = torch.cat([exact.to(out_dtype), approx], dim=-1)
    if cfg.delta_encoding:
        values = torch.cumsum(values.float(), dim=-1).to(out_dtype)
    return values.to(torch.float32).numpy()


# --------------------------------------------------------------------------- reading

def parquet_files(source: str) -> list[str]:
    """The dataset's Parquet files in DistillKit's order (data_0, data_1, ... numerically)."""
    fs, base = storage.resolve(source)
    if fs.isfile(base):
        return [source]
    found = [p for p in fs.ls(base, detail=False) if p.endswith(".parquet")]
    if not found:
        raise DistillKitFormatError(f"{source}: no .parquet files")

    def key(p: str) -> tuple:
        stem = p.rsplit("/", 1)[-1][:-len(".parquet")]
        tail = stem.rsplit("_", 1)[-1]
        return (0, int(tail), stem) if tail.isdigit() else (1, 0, stem)
    return [fs.unstrip_protocol(p) if not storage.is_local(fs) else p for p in sorted(found,
                                                                                     key=key)]


def _list_rows(inner, width: int, what: str, where: str) -> np.ndarray:
    """One sample's list<uint8> rows (a ListArray) -> uint8 [m, width]; every row must be exactly
    `width` bytes long."""
    lengths = inner.value_lengths().to_numpy(zero_copy_only=False)
    if lengths.size and (lengths != width).any():
        raise DistillKitFormatError(f"{where}: a {what} row holds "
                                    f"{int(lengths[lengths != width][0])} bytes, the compression "
                                    f"config implies {width}")
    flat = inner.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slicing
    return flat.astype(np.uint8, copy=False).reshape(lengths.size, width)


def iter_documents(source: str, cfg: CompressionConfig, counts: RepairCounts,
                   vocab_size: int) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    doc_id = 0
    for path in parquet_files(source):
        fs, p = storage.resolve(path)
        try:
            with fs.open(p, "rb") as fh:
                pf = pq.ParquetFile(fh)
                missing = {"input_ids", "bytepacked_indices", "compressed_logprobs"} - set(
                    pf.schema_arrow.names)
                if missing:
                    raise DistillKitFormatError(
                        f"{path}: missing columns {sorted(missing)} (a DistillKit dataset in the "
                        "DistributionQuantizationConfig format has input_ids, "
                        "bytepacked_indices, compressed_logprobs)")
                for batch in pf.iter_batches(batch_size=64, columns=[
                        "input_ids", "bytepacked_indices", "compressed_logprobs"]):
                    for r in range(batch.num_rows):
                        where = f"{path}: row {doc_id}"
                        tokens = np.asarray(batch.column("input_ids")[r].values,
                                            dtype=np.int64)
                        idx = _list_rows(batch.column("bytepacked_indices")[r].values,
                                         cfg.index_bytes, "bytepacked_indices", where)
                        lps = _list_rows(batch.column("compressed_logprobs")[r].values,
                                         cfg.logprob_bytes, "compressed_logprobs", where)
                        m = idx.shape[0]
                        if lps.shape[0] != m or m > max(tokens.shape[0] - 1, 0):
                            raise DistillKitFormatError(
                                f"{where}: {tokens.shape[0]} tokens but {m} index rows and "
                                f"{lps.shape[0]} log-prob rows (expected at most n - 1 each)")
                        ids = unpack_bits(idx, cfg.index_bits, cfg.k)
                        values = decode_logprobs(lps, cfg)
                        ids, values, keep = repair_topk_rows(ids, values, vocab_size, counts)
                        yield Document(doc_id=doc_id, tokens=tokens, ids=ids, logprobs=values,
                                       keep=keep)
                        doc_id += 1
        except (pa.ArrowException, OSError) as exc:
            raise DistillKitFormatError(f"{path}: cannot read as Parquet: {exc}") from None


def convert_distillkit(source: str, out: str, *, config: str | None = None,
                       window: int | None = None, codec: str | None = None,
                       vocab_size: int | None = None, teacher_name: str = "distillkit",
                       windows_per_shard: int = 16, progress: bool = False) -> dict[str, Any]:
    """Convert a DistillKit logit dataset (a folder of Parquet files or one file) into a kdcache
    dataset in `out`; returns a summary. `config` defaults to the folder's
    compression_config.yaml; `window` to the longest sample; `vocab_size` to the config's d."""
    t0 = time.perf_counter()
    fs, base = storage.resolve(source)
    if config is None:
        folder = source if not fs.isfile(base) else source.rsplit("/", 1)[0]
        config = storage.join(folder, CONFIG_NAME)
    cfg = read_config(config)
    vocab = int(vocab_size or cfg.d)
    if vocab < 2 ** (cfg.index_bits - 1):
        raise KdcacheError(f"--vocab-size {vocab} is below what {cfg.index_bits}-bit ids "
                           "imply; give the teacher's vocabulary size")
    longest = _longest_sample(source)
    window = int(window or longest)
    if window < longest:
        raise KdcacheError(f"--window {window} is shorter than the longest sample ({longest} "
                           "tokens); samples are never split (their targets would change)")
    header = DatasetHeader(
        kind="topk", k=cfg.k, vocab_size=vocab, codec=codec or default_codec("topk"),
        packing={"window": window, "mode": "document", "bos_id": None, "eos_id": None,
                 "positions": "reset", "windows_per_shard": windows_per_shard,
                 "policy": "next-fit whole samples (converted from DistillKit)"},
        teacher={"name": teacher_name, "source_format": "distillkit"},
        extra={"converted_from": {"format": "distillkit", "path": source,
                                  "compression_config": _config_dict(cfg)}})
    counts = RepairCounts()
    tokens = 0
    bar = token_bar(progress)
    writer = DatasetWriter(out, header, windows_per_shard=windows_per_shard)
    documents = 0
    for rec in pack_documents(iter_documents(source, cfg, counts, vocab), window=window,
                              k=cfg.k, mode="document"):
        writer.add(rec)
        tokens += rec.n_tokens
        documents += len(rec.doc_offsets) - 1
        if bar is not None:
            bar.update(rec.n_tokens)
    manifest = writer.close(stats={"convert": {"format": "distillkit", "documents": documents,
                                               "rows_changed": counts.as_dict()}})
    if bar is not None:
        bar.close()
    return conversion_summary(out, "distillkit", manifest, documents=documents, tokens=tokens,
                              started=t0, counts=counts, codec=header.codec)


def _config_dict(cfg: CompressionConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def _longest_sample(source: str) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    longest = 0
    for path in parquet_files(source):
        fs, p = storage.resolve(path)
        with fs.open(p, "rb") as fh:
            col = pq.read_table(fh, columns=["input_ids"]).column("input_ids")
        if len(col):
            longest = max(longest, int(pc.max(pc.list_value_length(col)).as_py() or 0))
    if longest == 0:
        raise DistillKitFormatError(f"{source}: no samples")
    return longest

