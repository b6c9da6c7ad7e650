"""`verify`: prove a dataset copy is complete and intact before anyone trains on it.

Checks, in order: the manifest (format, major version, every field's type, paths confined to
the dataset, no shard listed twice, window ranges disjoint, totals; manifest.py); the codec table
(size, xxh3); every shard (present, inside the dataset, size, Arrow magic, xxh3, column types,
schema metadata, window count); every window (window_index in its shard's range, token range,
document offsets, `valid` flags required by the packing mode, decoded targets with the same
checks the writer applies); window indices 0..W-1 once each. Problems are collected, not raised,
so one run lists everything wrong with a copy. `preflight` is the cheap subset a trainer runs
before its first step.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


from kdcache.errors import FormatError, KdcacheError
from kdcache.formats import storage
from kdcache.formats.manifest import SHARD_DIR
from kdcache.formats.reader import LogitDataset
from kdcache.formats.remote import ShardCache
from kdcache.formats.validate import validate_window


@dataclass
class VerifyReport:
    root: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shards_checked: int = 0
    windows_checked: int = 0
    tokens_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"root": self.root, "ok": self.ok, "problems": self.problems,
                "warnings": self.warnings, "shards_checked": self.shards_checked,
                "windows_checked": self.windows_checked, "tokens_checked": self.tokens_checked}


def verify_dataset(root: str | os.PathLike, *, decode: bool = True,
                   progress: bool = False) -> VerifyReport:
    """Check everything about a dataset; `decode=False` skips per-window target decoding."""
    report = VerifyReport(root=os.fspath(root))
    # A remote copy is verified as stored, never from a local cache of it: each shard is
    # downloaded into a scratch directory that goes away with the check.
    with tempfile.TemporaryDirectory(prefix="kdcache-verify-") as scratch:
        return _verify(root, report, decode=decode, progress=progress,
                       cache=ShardCache(scratch, max_bytes=1 << 62))


def _verify(root, report: VerifyReport, *, decode: bool, progress: bool,
            cache: ShardCache) -> VerifyReport:
    try:
        ds = LogitDataset(root, verify_hashes=True, max_open_shards=1, cache=cache)
    except KdcacheError as exc:
        report.problems.append(str(exc))
        return report

    seen_windows: list[int] = []
    shard_iter = range(len(ds.shards))
    if progress:
        from tqdm import tqdm
        shard_iter = tqdm(shard_iter, desc="verify", unit="shard")
    for s in shard_iter:
        info = ds.shards[s]
        try:
            reader = ds.shard(s)
        except KdcacheError as exc:
            report.problems.append(str(exc))
            continue
        report.shards_checked += 1
        tokens = valid_rows = 0
        for j in range(len(reader)):
            try:
                f = reader.fields(j)
                where = f"{reader.path}: window {f['window_index']}"
                seen_windows.append(f["window_index"])
                n = f["tokens"].shape[0]
                tokens += n
                valid_rows += int(f["valid"].sum())
                if decode:
                    w = ds.decode_window(f, where=where)
                    validate_window(w.to_record(), ds.header, where=reader.path)
                report.windows_checked += 1
                report.tokens_checked += n
            except KdcacheError as exc:
                report.problems.append(str(exc))
        for key, got, want in (("tokens", tokens, info.tokens),
                               ("valid_rows", valid_rows, info.valid_rows)):
            if got != want:
                report.problems.append(f"{reader.path}: {got} {key}, manifest says {want}")
        cache.evict(info.xxh3, info.bytes)  # a remote shard's scratch copy: one at a time

    if report.shards_checked == len(ds.shards):  # indices are only meaningful over every shard
        _check_window_indices(seen_windows, report)
    _check_stray_files(ds, report)
    return report


def _check_window_indices(seen: list[int], report: VerifyReport) -> None:
    """Window indices across all shards must be 0..W-1, each exactly once."""
    total = len(seen)
    counts = Counter(seen)
    repeated = sorted(w for w, c in counts.items() if c > 1)
    if repeated:
        report.problems.append(f"window_index repeated across shards: {repeated[:10]}")
    outside = sorted(w for w in counts if not 0 <= w < total)
    if outside:
        report.problems.append(f"window_index outside 0..{total - 1}: {outside[:10]}")
    missing = [w for w in range(total) if w not in counts][:10]
    if missing and not repeated and not outside:
        report.problems.append(f"window indices are not 0..{total - 1}: missing {missing}")


def _check_stray_files(ds: LogitDataset, report: VerifyReport) -> None:
    shard_dir = storage.join(ds.base, SHARD_DIR)
    try:
        present = {p.rsplit("/", 1)[-1] for p in ds.fs.ls(shard_dir, detail=False)}
    except (FileNotFoundError, OSError):
        return
    listed = {s.name.rsplit("/", 1)[-1] for s in ds.shards}
    for name in sorted(present - listed):
        kind = "leftover temporary file" if storage.TMP_MARKER in name else "file not in manifest"
        report.warnings.append(f"{storage.join(shard_dir, name)}: {kind}")


def preflight(ds: LogitDataset, *, hashes: bool = False) -> None:
    """Cheap dataset-level checks for a trainer to run before its first step, so that a dataset
    that cannot be trained on fails in seconds, not when a shard is first read an epoch later.

    The manifest was checked when `ds` was opened (fields, paths confined to the dataset, no
    shard listed twice, window ranges disjoint, totals adding up); this opens every shard's Arrow
    footer (size, magic, column types, the shard's own kind/k/vocabulary/codec/mode against the
    manifest, window count) and reads its first and last window_index against the manifest's
    range, without decoding targets. `hashes=True` also checks every shard's xxh3 (reads all
    bytes). Raises FormatError listing every problem found."""
    problems = []
    for info in ds.shards:
        try:
            reader = ds._open_shard(info, verify_hash=hashes)
            for j in sorted({0, len(reader) - 1}):
                reader.window_index(j)
        except KdcacheError as exc:
            problems.append(str(exc))
    if problems:
        raise FormatError(f"{ds.root}: dataset fails the pre-training check "
                          f"({len(problems)} problems; `kdcache verify` checks every window):\n  "
                          + "\n  ".join(problems[:20]))
