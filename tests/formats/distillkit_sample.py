"""A DistillKit-format logit dataset written from the layout alone (docs/convert.md), for the
converter tests: Parquet rows of input_ids, bytepacked_indices and compressed_logprobs, and the
compression_config.yaml beside them. Nothing here imports kdcache's converter.

`encode_row` follows DistillKit's compressor: sort descending, optional delta encoding, exact
values, a least-squares polynomial over the tail, residual bins quantised to scale = max|r| /
2^(bits-1); `reference_decode` is the decoder's arithmetic in float64 numpy (with the casts to
the stored dtypes), to check the converter against.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """int [m, n] -> uint8 [m, ceil(n*bits/8)], big-endian, MSB first, zero padded."""
    m, n = values.shape
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    bitmat = ((values.astype(np.uint64)[:, :, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bitmat.reshape(m, n * bits), axis=1)


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round to a stored dtype, back as float64."""
    return torch.from_numpy(np.asarray(x, dtype=np.float64)).to(DTYPES[dtype]).double().numpy()


def _bytes(x: np.ndarray, dtype: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(DTYPES[dtype])
    return t.contiguous().view(torch.uint8).numpy().reshape(x.shape[0], -1)


def _basis(cfg: dict, t: int) -> np.ndarray:
    pts = np.linspace(0, 1, t) if cfg.get("normalize_t") else np.arange(t, dtype=np.float64)
    pts = _cast(pts, cfg.get("term_dtype", "float32"))
    cols = [pts ** term if isinstance(term, int) else getattr(np, term)(pts)
            for term in cfg["polynomial_terms"] or []]
    return np.stack(cols, axis=-1) if cols else np.zeros((t, 0))


def encode_rows(logprobs: np.ndarray, cfg: dict) -> np.ndarray:
    """float [m, k] (descending) -> uint8 [m, bytes] compressed_logprobs rows."""
    k, exact_k = cfg["k"], cfg["exact_k"]
    v = logprobs.astype(np.float64)
    if cfg.get("delta_encoding", True):
        v = np.concatenate([v[:, :1], np.diff(v, axis=1)], axis=1)
    chunks = [_bytes(v[:, :exact_k], cfg["exact_dtype"])] if exact_k else []
    tail = v[:, exact_k:k]
    if cfg.get("polynomial_terms"):
        X = _basis(cfg, k - exact_k)
        coeffs = np.linalg.lstsq(X, tail.T, rcond=None)[0].T
        coeffs = _cast(coeffs, cfg["term_dtype"])
        chunks.append(_bytes(coeffs, cfg["term_dtype"]))
        tail = tail - coeffs @ X.T
    pos = 0
    for b in cfg.get("residual_bins") or []:
        r = tail[:, pos:pos + b["num_elements"]]
        bits = b["element_bits"]
        top = 1.0 if bits == 1 else 2.0 ** (bits - 1)
        amax = np.abs(r).max(axis=1, keepdims=True)
        scale = _cast(np.where(amax == 0, 1.0, amax / top), b["scale_dtype"])
        if bits == 1:
            q = np.clip(np.round(r / scale), 0, 1)
        else:
            q = np.clip(np.round(r / scale), -top, top - 1) + top
        chunks.append(_bytes(scale, b["scale_dtype"]))
        chunks.append(pack_bits(q.astype(np.int64), bits))
        pos += b["num_elements"]
    return np.concatenate(chunks, axis=1)


def reference_decode(rows: np.ndarray, cfg: dict) -> np.ndarray:
    """compressed_logprobs rows -> float64 [m, k], DistillKit's decoding in numpy."""
    k, exact_k = cfg["k"], cfg["exact_k"]
    size = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

    def floats(raw, dtype, n):
        t = torch.from_numpy(np.ascontiguousarray(raw)).view(DTYPES[dtype])
        return t.double().numpy().reshape(raw.shape[0], n)

    pos = exact_k * size[cfg["exact_dtype"]]
    exact = floats(rows[:, :pos], cfg["exact_dtype"], exact_k)
    terms = cfg.get("polynomial_terms") or []
    coeffs = None
    if terms:
        n = len(terms) * size[cfg["term_dtype"]]
        coeffs = floats(rows[:, pos:pos + n], cfg["term_dtype"], len(terms))
        pos += n
    res = np.zeros((rows.shape[0], k - exact_k))
    at = 0
    for b in cfg.get("residual_bins") or []:
        s = size[b["scale_dtype"]]
        scale = floats(rows[:, pos:pos + s], b["scale_dtype"], 1)
        pos += s
        nb = (b["num_elements"] * b["element_bits"] + 7) // 8
        bits = np.unpackbits(rows[:, pos:pos + nb], axis=1)[:, :b["num_elements"] * b[
            "element_bits"]].reshape(rows.shape[0], b["num_elements"], b["element_bits"])
        q = (bits * (2 ** np.arange(b["element_bits"] - 1, -1, -1))).sum(axis=2)
        pos += nb
        if b["element_bits"] == 1:
            res[:, at:at + b["num_elements"]] = (q * 2.0 - 1.0) * scale
        else:
            res[:, at:at + b["num_elements"]] = (q - 2 ** (b["element_bits"] - 1)) * scale
        at += b["num_elements"]
    tail = _cast(res, cfg["exact_dtype"])
    if coeffs is not None:
        tail = coeffs @ _basis(cfg, k - exact_k).T + tail
    values = np.concatenate([exact, tail], axis=1)
    if cfg.get("delta_encoding", True):
        values = _cast(np.cumsum(values, axis=1), cfg["exact_dtype"])
    return values


def index_bits(d: int) -> int:
    return int(np.ceil(np.log2(np.float32(d))))


def write_sample(folder: str, cfg: dict, samples: list[tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]],
                 rows_per_file: int = 3) -> None:
    """samples: (input_ids [n], ids [n-1, k], logprobs [n-1, k] descending). Writes
    data_0.parquet, data_1.parquet, ... and compression_config.yaml into `folder`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "compression_config.yaml"), "w") as fh:
        yaml.safe_dump(cfg, fh)
    schema = pa.schema([("input_ids", pa.list_(pa.uint64())),
                        ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                        ("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
    bits = index_bits(cfg["d"])
    for f, start in enumerate(range(0, len(samples), rows_per_file)):
        rows = {"input_ids": [], "compressed_logprobs": [], "bytepacked_indices": []}
        for tokens, ids, lps in samples[start:start + rows_per_file]:
            rows["input_ids"].append(tokens.tolist())
            rows["compressed_logprobs"].append(encode_rows(lps, cfg).tolist())
            rows["bytepacked_indices"].append(pack_bits(ids, bits).tolist())
        pq.write_table(pa.table(rows, schema=schema), os.path.join(folder, f"data_{f}.parquet"))
