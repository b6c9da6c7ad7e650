"""The dataset manifest (schema v1, FORMAT.md "manifest.json").

The manifest is the last file a writer puts in place: a dataset without one is incomplete, and a
reader refuses it. It records who made the targets (teacher identity), what they are (kind, k,
temperature), how the windows were packed, how targets are encoded (codec and its table), and
every shard with its size and xxh3-64 hash, so that `verify` can prove a copy is intact.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from kdcache.errors import FormatError
from kdcache.formats.window import PACKING_MODES

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
        try:
            return cls(**{f: d[f] for f in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise FormatError(f"manifest: invalid shard entry {d!r}: {exc}") from None


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
    """Parse and check a manifest's envelope; raises FormatError naming `where`."""
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: not a kdcache manifest (missing \"format\": \"{FORMAT_NAME}\")")
    version = str(manifest.get("format_version", ""))
    major = version.split(".")[0]
    if not major.isdigit():
        raise FormatError(f"{where}: invalid format_version {version!r}")
    if int(major) != int(FORMAT_VERSION.split(".")[0]):
        raise FormatError(
            f"{where}: format_version {version} has major version {major}; this kdcache reads "
            f"major version {FORMAT_VERSION.split('.')[0]} only (upgrade kdcache to read it)")
    for key in ("targets", "packing", "codec", "shards", "totals"):
        if key not in manifest:
            raise FormatError(f"{where}: missing required field {key!r}")
    if not isinstance(manifest["shards"], list):
        raise FormatError(f"{where}: 'shards' must be a list")
    DatasetHeader.from_manifest(manifest)  # field-level checks
    for entry in manifest["shards"]:
        ShardInfo.from_dict(entry)
    return manifest


def dump_manifest(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
