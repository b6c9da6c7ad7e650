"""Megatron-LM logits-saver shards -> kdcache datasets.

The layout (read from Megatron-LM's `megatron/training/distillation/logits_saver.py` and
`utils_logits.py`, not run; docs/convert.md has it in full): a directory of tar files
`cp{C}_dp{D}__{I}.tar` (context-parallel rank C, data-parallel rank D, last iteration I). Each tar
holds `_meta.json` first (`{"hash", "identifiers", "saver": {"k", "p", "min_k", "save_dtype"}}`)
and then one member `{iteration}.pt.zst` per training iteration: a zstd-compressed `torch.save` of
`{"values": [...], "indices_low": [...], "bit_17": [...]}`, one tensor per microbatch, each of
shape (seq_length, micro_batch, K): full-vocabulary log-probs (fp16/bf16/fp32) of the top K in
descending order, the ids' low 16 bits (uint16) and their 17th bit (bool). Position j of a
sample is the teacher's distribution for its label j, i.e. token j+1 of the seq_length+1 token
span Megatron's GPTDataset cuts.

The tars hold no tokens. `tokens` supplies them: an int array [samples, seq_length + 1] (or
[samples, seq_length]: then each sample's last target is dropped, its next token being unknown),
row s being sample s in the order Megatron's pretraining sampler hands samples out: iteration i,
microbatch m, data-parallel rank r, batch position b is sample
i * G + m * (mbs * dp) + r * mbs + b, with G = mbs * dp * microbatches (a constant global batch
size, training from iteration 0).

Each sample becomes one window in `causal` mode (Megatron's default attention: the whole span,
documents separated by EOD only). Refused: top-p saves (p set: truncated rows with sentinel
entries), context-parallel saves (cp > 0: sequence chunks in Megatron's load-balanced order).
The payloads are read without unpickling (torch_payload).
"""

from __future__ import annotations

import itertools
import json
import re
import tarfile
import time
from typing import Any, Iterator

import numpy as np

from kdcache.errors import FormatError, KdcacheError
from kdcache.formats import storage
from kdcache.formats.codecs import default_codec
from kdcache.formats.convert import torch_payload
from kdcache.formats.convert.common import (RepairCounts, conversion_summary, repair_topk_rows,
                                           token_bar)
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.packing import default_valid
from kdcache.formats.window import WindowRecord
from kdcache.formats.writer import DatasetWriter

TAR_RE = re.compile(r"^cp(?P<cp>\d+)_dp(?P<dp>\d+)__(?P<iter>\d+)\.tar$")
MEMBER_RE = re.compile(r"^(?P<iter>\d+)\.pt\.zst$")
META_MEMBER = "_meta.json"
_MAX_PAYLOAD = 16 << 30  # decompressed bytes of one iteration, a bound against zstd bombs


class MegatronFormatError(FormatError):
    """Megatron logits-saver shards that do not follow its layout, or cannot be aligned."""


def list_tars(source: str) -> dict[int, list[str]]:
    """dp rank -> its tar paths in iteration order; refuses context-parallel saves."""
    fs, base = storage.resolve(source)
    by_rank: dict[int, list[tuple[int, str]]] = {}
    for p in fs.ls(base, detail=False):
        m = TAR_RE.match(p.rsplit("/", 1)[-1])
        if not m:
            continue
        if int(m.group("cp")) != 0:
            raise MegatronFormatError(
                f"{source}: context-parallel saves (cp{m.group('cp')}) are not supported: each "
                "holds sequence chunks in Megatron's load-balanced order")
        by_rank.setdefault(int(m.group("dp")), []).append((int(m.group("iter")), p))
    if not by_rank:
        raise MegatronFormatError(f"{source}: no cp*_dp*__*.tar logits-saver shards")
    ranks = sorted(by_rank)
    if ranks != list(range(len(ranks))):
        raise MegatronFormatError(f"{source}: data-parallel ranks {ranks} are not 0..{len(ranks) - 1}")
    return {r: [p for _, p in sorted(by_rank[r])] for r in ranks}


def _iter_members(fs, paths: list[str], where: str) -> Iterator[tuple[int, dict, Any]]:
    """(iteration, meta, payload) of one rank's tars, in order, streaming."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    for path in paths:
        meta = None
        with fs.open(path, "rb") as fh:
            try:
                with tarfile.open(fileobj=fh, mode="r|*") as tar:
                    for member in tar:
                        if not member.isreg():
                            continue
                        if member.name == META_MEMBER:
                            try:
                                meta = json.loads(tar.extractfile(member).read())
                            except ValueError:
                                raise MegatronFormatError(f"{path}: _meta.json is not JSON") \
                                    from None
                            continue
                        m = MEMBER_RE.match(member.name)
                        if not m:
                            continue
                        if meta is None:
                            raise MegatronFormatError(f"{path}: payload before _meta.json")
                        raw = tar.extractfile(member).read()
                        try:
                            data = dctx.decompress(raw, max_output_size=_MAX_PAYLOAD)
                        except zstandard.ZstdError as exc:
                            raise MegatronFormatError(f"{path}: {member.name}: bad zstd data "
                                                      f"({exc})") from None
                        payload = torch_payload.load(data, where=f"{path}: {member.name}")
                        yield int(m.group("iter")), meta, payload
            except tarfile.TarError as exc:
                raise MegatronFormatError(f"{path}: not a readable tar ({exc})") from None


def _microbatches(payload: Any, where: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(ids int64 [seq, mbs, K], log-probs float32 [seq, mbs, K]) per microbatch]."""
    if not isinstance(payload, dict) or not {"values", "indices_low", "bit_17"} <= set(payload):
        raise MegatronFormatError(f"{where}: payload is not {{values, indices_low, bit_17}}")
    out = []
    for v, lo, hi in zip(payload["values"], payload["indices_low"], payload["bit_17"]):
        if not all(isinstance(t, torch_payload.Tensor) for t in (v, lo, hi)):
            raise MegatronFormatError(f"{where}: payload lists must hold tensors")
        if v.array.ndim != 3 or lo.array.shape != v.array.shape or hi.array.shape != v.array.shape:
            raise MegatronFormatError(f"{where}: tensors must share one (seq, batch, K) shape, "
                                      f"got {v.array.shape}, {lo.array.shape}, {hi.array.shape}")
        ids = (hi.array.astype(np.int64) << 16) | lo.array.astype(np.int64)
        out.append((ids, v.as_float32()))
    if not out or len({len(payload[k]) for k in ("values", "indices_low", "bit_17")}) != 1:
        raise MegatronFormatError(f"{where}: empty or unequal microbatch lists")
    return out


def _load_tokens(path: str) -> np.ndarray:
    fs, p = storage.resolve(path)
    with fs.open(p, "rb") as fh:
        try:
            tokens = np.load(fh, allow_pickle=False)
        except ValueError as exc:
            raise KdcacheError(f"{path}: not a .npy array (pickled arrays are refused): {exc}") \
                from None
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise KdcacheError(f"{path}: tokens must be a 2-D integer array [samples, length], got "
                           f"{tokens.dtype} {tokens.shape}")
    return tokens


def iter_samples(source: str, tokens: np.ndarray, info: dict[str, Any]) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(sample index, tokens [n], ids [seq, K], log-probs [seq, K]) in sample order: the ranks'
    tars are read in lockstep, one iteration at a time."""
    fs, _ = storage.resolve(source)
    ranks = list_tars(source)
    dp = len(ranks)
    streams = [_iter_members(fs, ranks[r], source) for r in range(dp)]
    while True:
        items = [next(s, None) for s in streams]
        if all(it is None for it in items):
            return
        if any(it is None for it in items) or len({it[0] for it in items}) != 1:
            raise MegatronFormatError(
                f"{source}: the data-parallel ranks' tars do not hold the same iterations "
                f"({[it[0] if it else None for it in items]})")
        iteration, meta, _ = items[0]
        saver = meta.get("saver", {})
        if saver.get("p") is not None:
            raise MegatronFormatError(
                f"{source}: saved with top-p (p={saver['p']}): rows are truncated with "
                "sentinel entries and do not hold k targets; convert a top-k save")
        info.setdefault("saver", saver)
        info.setdefault("dataset_hash", meta.get("hash"))
        per_rank = [_microbatches(it[2], f"{source}: iteration {iteration}") for it in items]
        n_micro = len(per_rank[0])
        seq, mbs, _ = per_rank[0][0][0].shape
        if any(len(mb) != n_micro or any(x[0].shape[:2] != (seq, mbs) for x in mb)
               for mb in per_rank):
            raise MegatronFormatError(f"{source}: iteration {iteration}: ranks disagree on "
                                      "microbatches or their shapes")
        info["seq_length"], info["micro_batch"], info["dp"] = seq, mbs, dp
        global_batch = mbs * dp * n_micro
        for m in range(n_micro):
            for r in range(dp):
                ids_mb, lp_mb = per_rank[r][m]
                for b in range(mbs):
                    s = iteration * global_batch + m * mbs * dp + r * mbs + b
                    if s >= tokens.shape[0]:
                        raise MegatronFormatError(
                            f"{source}: iteration {iteration} holds sample {s}, but the tokens "
                            f"array has {tokens.shape[0]} samples")
                    yield s, tokens[s], ids_mb[:, b, :], lp_mb[:, b, :]


def convert_megatron(source: str, out: str, *, tokens: str, vocab_size: int,
                     codec: str | None = None, teacher_name: str = "megatron",
                     windows_per_shard: int = 16, progress: bool = False) -> dict[str, Any]:
    """Convert a directory of Megatron logits-saver tars (plus the samples' token ids) into a
    kdcache dataset; returns a summary."""
    t0 = time.perf_counter()
    token_rows = _load_tokens(tokens)
    if not 0 < vocab_size < 2 ** 31:
        raise KdcacheError(f"--vocab-size must be positive, got {vocab_size}")
    counts = RepairCounts()
    info: dict[str, Any] = {}
    samples = iter_samples(source, token_rows, info)
    first = next(samples, None)
    if first is None:
        raise MegatronFormatError(f"{source}: the tars hold no iterations")
    seq = first[2].shape[0]
    length = token_rows.shape[1]
    if length not in (seq, seq + 1):
        raise KdcacheError(f"{tokens}: samples of {length} tokens, but the logits cover "
                           f"{seq} positions: give seq_length + 1 (or seq_length) tokens each")
    k = first[2].shape[1]
    header = DatasetHeader(
        kind="topk", k=k, vocab_size=int(vocab_size), codec=codec or default_codec("topk"),
        packing={"window": length, "mode": "causal", "bos_id": None, "eos_id": None,
                 "positions": "global", "windows_per_shard": windows_per_shard,
                 "policy": "one Megatron sample per window (converted from Megatron-LM)"},
        teacher={"name": teacher_name, "source_format": "megatron-logits-saver"},
        extra={"converted_from": {"format": "megatron-logits-saver", "path": source}})
    writer = DatasetWriter(out, header, windows_per_shard=windows_per_shard)
    bar = token_bar(progress)
    written = n_tokens = 0
    dropped_last = 0
    for s, toks, ids, lps in itertools.chain([first], samples):
        if s != written:
            raise MegatronFormatError(f"{source}: sample {s} follows sample {written - 1}: the "
                                      "saves do not start at iteration 0 or skip iterations")
        n = toks.shape[0]
        rows = min(seq, n - 1)
        dropped_last += seq - rows
        ids_r, lps_r, keep = repair_topk_rows(ids[:rows], lps[:rows], vocab_size, counts)
        full_ids = np.full((n, k), -1, dtype=np.int64)
        full_lp = np.full((n, k), -np.inf, dtype=np.float32)
        full_ids[:rows], full_lp[:rows] = ids_r, lps_r
        offsets = np.array([0, n], dtype=np.int64)
        valid = default_valid(n, offsets, "causal")
        valid[:rows] &= keep
        writer.add(WindowRecord(window_index=written, tokens=toks.astype(np.int64),
                                doc_offsets=offsets, valid=valid, ids=full_ids, values=full_lp,
                                doc_ids=np.array([s], dtype=np.int64),
                                doc_pieces=np.zeros(1, dtype=np.int32)))
        written += 1
        n_tokens += n
        if bar is not None:
            bar.update(n)
    if dropped_last:
        counts.extra["last_targets_without_next_token"] = dropped_last
    manifest = writer.close(stats={"convert": {"format": "megatron-logits-saver",
                                               "samples": written, "saver": info.get("saver"),
                                               "dataset_hash": info.get("dataset_hash"),
                                               "rows_changed": counts.as_dict()}})
    if bar is not None:
        bar.close()
    return conversion_summary(out, "megatron", manifest, documents=written, tokens=n_tokens,
                              started=t0, counts=counts, codec=header.codec)
