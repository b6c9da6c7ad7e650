"""Codec registry. `get_codec(name)` returns a codec class; defaults are chosen by measurement
(BENCHMARKS.md, `kdcache codec eval`)."""

from __future__ import annotations

from kdcache.formats.codecs.base import TARGET_KINDS, TargetCodec, id_dtype
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.codecs.qrank import QRankCodec
from kdcache.formats.codecs.raw import RawCodec

_REGISTRY: dict[str, type[TargetCodec]] = {RawCodec.name: RawCodec, QRankCodec.name: QRankCodec}

# Measured: BENCHMARKS.md "Codec (formats)" (qrank ~1.4 B/entry at k=64 vs raw ~4).
DEFAULT_CODEC: dict[str, str] = {"topk": "qrank", "sampled": "qrank"}


def register_codec(cls: type[TargetCodec]) -> type[TargetCodec]:
    _REGISTRY[cls.name] = cls
    return cls


def get_codec(name: str) -> type[TargetCodec]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown codec {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def available_codecs() -> list[str]:
    return sorted(_REGISTRY)


def default_codec(kind: str) -> str:
    return DEFAULT_CODEC[kind]


def make_codec(header: DatasetHeader, table: bytes | None = None) -> TargetCodec:
    """The codec instance a dataset's header describes (with its dataset-level table, if any);
    parameters the header leaves out take the codec's defaults."""
    cls = get_codec(header.codec)
    return cls(kind=header.kind, k=header.k, vocab_size=header.vocab_size, table=table,
               **header.codec_params)


__all__ = ["TARGET_KINDS", "TargetCodec", "id_dtype", "get_codec", "register_codec",
           "available_codecs", "default_codec", "make_codec", "DEFAULT_CODEC", "RawCodec", "QRankCodec"]
