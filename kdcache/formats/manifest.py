"""The dataset manifest (schema v1, FORMAT.md "manifest.json").

The manifest is the last file a writer puts in place: a dataset without one is incomplete, and a
reader refuses it. It records who made the targets (teacher identity), what they are (kind, k,
temperature), how the windows were packed, how targets are encoded (codec and its table), and
every shard with its size and xxh3-64 hash, so that `verify` can prove a copy is intact.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from kdcache.errors import FormatError
from kdcache.formats.packing import PACKING_MODES

FORMAT_NAME = "kdcache-logits"
FORMAT_VERSION = "1.1.0"  # 1.1: packing.targets (which rows of a conversation get targets)
MANIFEST_NAME = "manifest.json"
CARD_NAME = "README.md"
SHARD_DIR = "shards"
TABLE_PATH = "codec/table.bin"


@dataclass
class DatasetHeader:
    """Everything about a dataset that is fixed before its first shard is written."""

    kind: str  # "topk" | "sampled"
    k: int  # top-k size, or the maximum number of sampled ids per row
    vocab_size: int  # teacher vocabulary (lm_head rows); every id is below it
    packing: dict[str, Any]  # window, mode, bos_id, eos_id, seed, split_long_docs, ...
    codec: str
    codec_params: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)  # name, path, config_hash, tokenizer_hash
    temperature: float = 1.0  # the teacher's temperature; log-probs are over the full vocabulary
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("topk", "sampled"):
            raise ValueError(f"target kind must be 'topk' or 'sampled', got {self.kind!r}")
        if not isinstance(self.k, int) or self.k <= 0:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if not isinstance(self.vocab_size, int) or not 0 < self.vocab_size < 2**31:
            raise ValueError(f"vocab_size must be an integer in [1, 2^31), got {self.vocab_size!r}")
        if self.k > self.vocab_size:
            raise ValueError(f"k={self.k} exceeds vocab_size={self.vocab_size}")
        mode = self.packing.get("mode")
        if mode not in PACKING_MODES:
            raise ValueError(f"packing['mode'] must be one of {PACKING_MODES}, got {mode!r}")

    def to_manifest_fields(self) -> dict[str, Any]:
        return {
            "teacher": dict(self.teacher),
            "targets": {
                "kind": self.kind,
                "k": self.k,
                "vocab_size": self.vocab_size,
                "temperature": self.temperature,
                "normalization": "full-vocabulary log-probs" if self.kind == "topk"
                else "weights summing to 1 per row",
            },
            "packing": dict(self.packing),
            "codec": {"name": self.codec, "params": dict(self.codec_params)},
            "extra": dict(self.extra),
        }

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "DatasetHeader":
        try:
            targets = manifest["targets"]
            return cls(
                kind=targets["kind"], k=int(targets["k"]), vocab_size=int(targets["vocab_size"]),
                temperature=float(targets.get("temperature", 1.0)),
                packing=dict(manifest["packing"]), codec=manifest["codec"]["name"],
                codec_params=dict(manifest["codec"].get("params", {})),
                teacher=dict(manifest.get("teacher", {})), extra=dict(manifest.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"manifest: missing or invalid field: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ShardInfo:
    """One shard as the manifest lists it."""

    name: str  # path relative to the dataset root, e.g. "shards/shard-00000.arrow"
    windows: int
    tokens: int
    valid_rows: int
    bytes: int  # file size
    target_bytes: int  # bytes of encoded targets (codec blobs + valid bitmaps)
    xxh3: str  # xxh3-64 of the whole file, hex
    first_window: int  # smallest window_index in the shard
    last_window: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardInfo":
        """One shard entry, every field typed and in range (a manifest is untrusted input)."""
        if not isinstance(d, dict):
            raise FormatError(f"manifest: shard entry must be an object, got {_short(d)}")
        values = {}
        for name in cls.__dataclass_fields__:
            if name not in d:
                raise FormatError(f"manifest: shard entry {_short(d)} lacks {name!r}")
            v = d[name]
            if name == "name":
                v = check_relative_path(v, what="shard name")
            elif name == "xxh3":
                if not (isinstance(v, str) and _XXH3.fullmatch(v)):
                    raise FormatError(f"manifest: shard {d['name']!r}: xxh3 must be 16 hex digits, "
                                      f"got {_short(v)}")
            elif not _is_count(v):
                raise FormatError(f"manifest: shard {_short(d['name'])}: {name} must be a "
                                  f"non-negative integer, got {_short(v)}")
            values[name] = v
        info = cls(**values)
        if info.windows < 1 or info.last_window - info.first_window + 1 < info.windows:
            raise FormatError(f"manifest: shard {info.name!r}: {info.windows} windows do not fit "
                              f"its range {info.first_window}..{info.last_window}")
        return info


def build_manifest(header: DatasetHeader, shards: list[ShardInfo], *,
                   table: dict[str, Any] | None, stats: dict[str, Any] | None,
                   created_by: str) -> dict[str, Any]:
    shards = sorted(shards, key=lambda s: s.first_window)
    tokens = sum(s.tokens for s in shards)
    table_bytes = table["bytes"] if table else 0
    target_bytes = sum(s.target_bytes for s in shards) + table_bytes
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "created_by": created_by,
        **header.to_manifest_fields(),
        "totals": {
            "shards": len(shards),
            "windows": sum(s.windows for s in shards),
            "tokens": tokens,
            "valid_rows": sum(s.valid_rows for s in shards),
            "bytes": sum(s.bytes for s in shards) + table_bytes,
            "target_bytes": target_bytes,
            "target_bytes_per_token": (target_bytes / tokens) if tokens else 0.0,
        },
        "shards": [asdict(s) for s in shards],
        "stats": dict(stats or {}),
    }
    manifest["codec"]["table"] = table
    return manifest


def parse_manifest(text: str | bytes, *, where: str) -> dict[str, Any]:
    """Parse and check a manifest: envelope, every field's type and range, shard entries (names
    confined to the dataset, none listed twice, window ranges disjoint, totals adding up).
    Raises FormatError naming `where`; nothing else escapes, whatever the bytes."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{where}: {len(text):,} bytes is more than a manifest may hold "
                          f"({MAX_MANIFEST_BYTES:,})")
    manifest = _load_json(text, where=where)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: not a kdcache manifest (missing \"format\": \"{FORMAT_NAME}\")")
    version = manifest.get("format_version")
    major = version.split(".")[0] if isinstance(version, str) else ""
    if not (major.isascii() and major.isdigit()) or len(major) > 6:
        raise FormatError(f"{where}: invalid format_version {_short(version)}")
    if int(major) != int(FORMAT_VERSION.split(".")[0]):
        raise FormatError(
            f"{where}: format_version {version} has major version {major}; this kdcache reads "
            f"major version {FORMAT_VERSION.split('.')[0]} only (upgrade kdcache to read it)")
    try:
        _check_fields(manifest)
        DatasetHeader.from_manifest(manifest)
        _check_shards([ShardInfo.from_dict(entry) for entry in manifest["shards"]],
                      manifest["totals"], manifest["packing"]["window"])
    except FormatError as exc:
        raise FormatError(f"{where}: {str(exc).removeprefix('manifest: ')}") from None
    return manifest


# -- untrusted-input rules ---------------------------------------------------------------------

MAX_MANIFEST_BYTES = 256 << 20  # ~1M shard entries; anything larger is not a manifest
MAX_JSON_DEPTH = 32  # free-form objects (teacher, extra, stats, params) nest a few levels at most
_XXH3 = re.compile(r"[0-9a-f]{16}")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _load_json(text: str | bytes, *, where: str) -> Any:
    """json.loads with NaN/Infinity refused and nesting bounded (a deep document would exhaust
    the parser's recursion); every failure is a FormatError."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise FormatError(f"{where}: not valid JSON (nested too deeply)") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise FormatError(f"{where}: not valid JSON ({_short(str(exc), 200)})") from None
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        raise FormatError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        if depth > limit:
            return True
        stack.extend((item, depth + 1) for item in v if isinstance(item, (dict, list)))
    return False


def check_relative_path(path: Any, *, what: str) -> str:
    """A path a manifest names, which must stay inside the dataset: relative, '/'-separated, no
    empty, '.' or '..' parts, no backslashes or control characters. (Symlinks are the reader's
    part: it resolves the path on disk before opening it.)"""
    if not isinstance(path, str) or not path or len(path) > 1024:
        raise FormatError(f"manifest: {what} must be a non-empty relative path, got {_short(path)}")
    parts = path.split("/")
    if (path.startswith("/") or "\\" in path or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)
            or any(ord(c) < 32 or c == "\x7f" for c in path)):
        raise FormatError(f"manifest: {what} {_short(path)} is not a plain path inside the "
                          "dataset (absolute paths, '..', empty parts and backslashes are refused)")
    return path


_OBJECT_FIELDS = ("targets", "packing", "codec", "totals")
_OPTIONAL_OBJECTS = ("teacher", "extra", "stats")


def _check_fields(manifest: dict[str, Any]) -> None:
    """Types of every field a reader uses, so that later code never meets a wrong type."""
    for key in _OBJECT_FIELDS + ("shards",):
        if key not in manifest:
            raise FormatError(f"manifest: missing required field {key!r}")
    for key in _OBJECT_FIELDS:
        if not isinstance(manifest[key], dict):
            raise FormatError(f"manifest: {key!r} must be an object, got {_short(manifest[key])}")
    for key in _OPTIONAL_OBJECTS:
        if not isinstance(manifest.get(key, {}), dict):
            raise FormatError(f"manifest: {key!r} must be an object, got {_short(manifest[key])}")
    if not isinstance(manifest["shards"], list):
        raise FormatError("manifest: 'shards' must be a list")
    targets, packing, codec = manifest["targets"], manifest["packing"], manifest["codec"]
    for key in ("k", "vocab_size"):
        if not _is_count(targets.get(key)):
            raise FormatError(f"manifest: targets.{key} must be a non-negative integer, "
                              f"got {_short(targets.get(key))}")
    temperature = targets.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 < temperature < float("inf"):
        raise FormatError(f"manifest: targets.temperature must be a positive number, "
                          f"got {_short(temperature)}")
    window = packing.get("window")
    if not (_is_count(window) and window > 0):
        raise FormatError(f"manifest: packing.window must be a positive integer, got {_short(window)}")
    if not isinstance(codec.get("name"), str):
        raise FormatError(f"manifest: codec.name must be a string, got {_short(codec.get('name'))}")
    if not isinstance(codec.get("params", {}), dict):
        raise FormatError(f"manifest: codec.params must be an object, got {_short(codec['params'])}")
    table = codec.get("table")
    if table is not None:
        if not isinstance(table, dict) or not _is_count(table.get("bytes")) \
                or not (isinstance(table.get("xxh3"), str) and _XXH3.fullmatch(table["xxh3"])):
            raise FormatError(f"manifest: codec.table must be {{path, bytes, xxh3}}, got "
                              f"{_short(table)}")
        check_relative_path(table.get("path"), what="codec table path")
    for key in ("shards", "windows", "tokens", "valid_rows", "bytes", "target_bytes"):
        if not _is_count(manifest["totals"].get(key)):
            raise FormatError(f"manifest: totals.{key} must be a non-negative integer, got "
                              f"{_short(manifest['totals'].get(key))}")
    per_token = manifest["totals"].get("target_bytes_per_token")
    if isinstance(per_token, bool) or not isinstance(per_token, (int, float)) or per_token < 0:
        raise FormatError(f"manifest: totals.target_bytes_per_token must be a non-negative number, "
                          f"got {_short(per_token)}")


_MIN_WINDOW_BYTES = 64  # an Arrow record batch takes more than this: bounds a shard's count


def _check_shards(shards: list[ShardInfo], totals: dict[str, Any], window: int) -> None:
    """Dataset-level consistency of the shard list: no shard listed twice, counts a shard of its
    size can hold, window ranges that do not overlap and lie in 0..W-1, totals that add up.
    Cheap: manifest only, no file opened (so a count is never trusted to size an allocation)."""
    names: set[str] = set()
    for s in shards:
        if s.name in names:
            raise FormatError(f"manifest: shard {s.name!r} is listed more than once")
        names.add(s.name)
        if s.windows * _MIN_WINDOW_BYTES > s.bytes or s.tokens > s.windows * window \
                or s.valid_rows > s.tokens or s.tokens < s.windows:
            raise FormatError(f"manifest: shard {s.name!r}: {s.windows} windows, {s.tokens} "
                              f"tokens, {s.valid_rows} valid rows in {s.bytes} bytes do not fit "
                              f"windows of at most {window} tokens")
    windows = sum(s.windows for s in shards)
    ranges = sorted((s.first_window, s.last_window, s.name) for s in shards)
    for (_, last, name), (first, _, other) in zip(ranges, ranges[1:]):
        if first <= last:
            raise FormatError(f"manifest: shards {name!r} and {other!r} claim overlapping window "
                              f"ranges (a shard listed twice, or one from another dataset?)")
    if ranges and ranges[-1][1] >= windows:
        raise FormatError(f"manifest: shard {ranges[-1][2]!r} claims window {ranges[-1][1]}, but "
                          f"the shards hold {windows} windows (0..{windows - 1})")
    sums = {"shards": len(shards), "windows": windows,
            "tokens": sum(s.tokens for s in shards),
            "valid_rows": sum(s.valid_rows for s in shards)}
    for key, got in sums.items():
        if totals[key] != got:
            raise FormatError(f"manifest: totals.{key} is {totals[key]}, the shard entries add up "
                              f"to {got}")


def dump_manifest(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
