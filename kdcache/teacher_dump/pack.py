"""Packing: tokenize documents, wrap each as BOS ... EOS, pack whole documents into windows.

Design (deterministic, streaming):
- Documents arrive in corpus order and are tokenized in batches with the teacher's tokenizer
  (special tokens off; BOS and EOS are added here, so every teacher is treated alike).
- Every `shuffle_buffer` documents are permuted with a generator seeded by (seed, buffer number),
  then packed next-fit: a document joins the current window if it fits, otherwise the window is
  closed and the document opens the next one. Windows therefore hold whole documents and have at
  most `window` tokens (usually a little fewer); memory is bounded by the shuffle buffer.
- A document longer than the window (BOS + tokens + EOS > window) is over-long: with
  `split_long_docs` (the default) it is cut into pieces of exactly `window` tokens (the last piece
  shorter), each piece alone in its window, numbered in `doc_pieces` (0 = first piece, which keeps
  the BOS; only the last keeps the EOS); otherwise it is dropped. Both are counted in `PackStats`.
- The last window of the corpus is kept even if it is short (nothing is lost); `window_index`
  counts windows from 0 in packing order.

The same corpus, tokenizer, window, seed and buffer size always give the same windows, which is
what lets the runner plan shards up front and resume by shard name.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import numpy as np

from kdcache.errors import KdcacheError


class PackingError(KdcacheError):
    """Packing cannot proceed (no EOS token, window too small, ...)."""


@dataclass(frozen=True)
class PackConfig:
    window: int = 131072
    seed: int = 0
    split_long_docs: bool = True
    shuffle_buffer: int = 4096  # documents permuted together
    bos_id: int | None = None  # None: the tokenizer's BOS (or no BOS if it has none)
    eos_id: int | None = None  # None: the tokenizer's EOS (required)
    tokenize_batch: int = 256

    def __post_init__(self) -> None:
        if self.window < 4:
            raise PackingError(f"window must be at least 4 tokens, got {self.window}")
        if self.shuffle_buffer < 1:
            raise PackingError("shuffle_buffer must be at least 1")


@dataclass
class PackedWindow:
    """One window before the teacher: tokens plus document boundaries (cu_seqlens)."""

    window_index: int
    tokens: np.ndarray  # int32 [n]
    doc_offsets: np.ndarray  # int64 [d+1], 0 ... n
    doc_ids: np.ndarray  # int64 [d], corpus doc_id of each segment
    doc_pieces: np.ndarray  # int32 [d], piece number of a split document, 0 otherwise

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class PackStats:
    documents: int = 0  # documents packed (whole or split)
    tokens: int = 0  # tokens in windows, BOS/EOS included
    windows: int = 0
    over_long: int = 0  # documents longer than the window
    split: int = 0  # over-long documents split into pieces
    dropped_over_long: int = 0  # over-long documents dropped (split_long_docs=False)
    pieces: int = 0  # pieces produced from split documents
    fill: float = 0.0  # tokens / (windows * window)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- tokenizer


class TeacherTokenizer:
    """The teacher's tokenizer (a HF tokenizer directory) with the BOS/EOS ids packing uses."""

    def __init__(self, model_dir: str, bos_id: int | None = None, eos_id: int | None = None):
        from transformers import AutoTokenizer

        if not os.path.isdir(model_dir):
            raise PackingError(f"{model_dir}: teacher model directory not found")
        try:
            self.tok = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise PackingError(f"{model_dir}: cannot load the teacher's tokenizer: {exc}") from None
        self.bos_id = bos_id if bos_id is not None else self.tok.bos_token_id
        self.eos_id = eos_id if eos_id is not None else self.tok.eos_token_id
        if self.eos_id is None:
            raise PackingError(f"{model_dir}: the tokenizer has no EOS token; pass --eos-id")
        self.vocab_hash = tokenizer_hash(model_dir)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]


def tokenizer_hash(model_dir: str) -> str:
    """xxh3 of the tokenizer files: two dumps with equal hashes tokenized text identically."""
    import xxhash

    h = xxhash.xxh3_64()
    for name in sorted(os.listdir(model_dir)):
        if name.startswith("tokenizer") or name in ("vocab.json", "merges.txt",
                                                    "special_tokens_map.json"):
            with open(os.path.join(model_dir, name), "rb") as fh:
                h.update(name.encode() + b"\0" + fh.read())
    return h.hexdigest()


# ---------------------------------------------------------------------------- packing


def _wrap(ids: list[int], bos: int | None, eos: int) -> np.ndarray:
    head = [bos] if bos is not None else []
    return np.asarray(head + list(ids) + [eos], dtype=np.int32)


class _WindowBuilder:
    def __init__(self, window: int) -> None:
        self.window = window
        self.next_index = 0
        self._reset()

    def _reset(self) -> None:
        self.parts: list[np.ndarray] = []
        self.doc_ids: list[int] = []
        self.pieces: list[int] = []
        self.used = 0

    def fits(self, n: int) -> bool:
        return self.used + n <= self.window

    def add(self, tokens: np.ndarray, doc_id: int, piece: int) -> None:
        self.parts.append(tokens)
        self.doc_ids.append(doc_id)
        self.pieces.append(piece)
        self.used += len(tokens)

    def close(self) -> PackedWindow | None:
        if not self.parts:
            return None
        lengths = np.fromiter((len(p) for p in self.parts), dtype=np.int64, count=len(self.parts))
        win = PackedWindow(
            window_index=self.next_index, tokens=np.concatenate(self.parts),
            doc_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            doc_ids=np.asarray(self.doc_ids, dtype=np.int64),
            doc_pieces=np.asarray(self.pieces, dtype=np.int32))
        self.next_index += 1
        self._reset()
        return win


def pack_token_docs(docs: Iterable[tuple[int, list[int]]], cfg: PackConfig, bos: int | None,
                    eos: int, stats: PackStats) -> Iterator[PackedWindow]:
    """Pack already tokenized `(doc_id, ids)` documents (no special tokens) into windows."""
    builder = _WindowBuilder(cfg.window)
    buffer: list[tuple[int, list[int]]] = []
    buffer_no = 0

    def flush_buffer() -> Iterator[PackedWindow]:
        nonlocal buffer_no
        rng = np.random.default_rng([cfg.seed, buffer_no])
        buffer_no += 1
        for j in rng.permutation(len(buffer)):
            doc_id, ids = buffer[j]
            tokens = _wrap(ids, bos, eos)
            if len(tokens) > cfg.window:
                stats.over_long += 1
                if not cfg.split_long_docs:
                    stats.dropped_over_long += 1
                    if len(stats.problems) < 20:
                        stats.problems.append(f"doc {doc_id}: {len(tokens)} tokens > window "
                                              f"{cfg.window}, dropped")
                    continue
                stats.split += 1
                stats.documents += 1
                if (w := builder.close()) is not None:
                    yield w
                for piece, start in enumerate(range(0, len(tokens), cfg.window)):
                    builder.add(tokens[start:start + cfg.window], doc_id, piece)
                    stats.pieces += 1
                    yield builder.close()
                continue
            stats.documents += 1
            if not builder.fits(len(tokens)):
                yield builder.close()
            builder.add(tokens, doc_id, 0)
        buffer.clear()

    for item in docs:
        buffer.append(item)
        if len(buffer) >= cfg.shuffle_buffer:
            yield from flush_buffer()
    if buffer:
        yield from flush_buffer()
    if (w := builder.close()) is not None:
        yield w


def pack_documents(texts: Iterable[tuple[int, str]], tokenizer: TeacherTokenizer,
                   cfg: PackConfig, stats: PackStats) -> Iterator[PackedWindow]:
    """Tokenize `(doc_id, text)` documents in batches and pack them; counts go to `stats`."""

    def tokenized() -> Iterator[tuple[int, list[int]]]:
        batch: list[tuple[int, str]] = []
        for item in texts:
            batch.append(item)
            if len(batch) >= cfg.tokenize_batch:
                yield from zip((d for d, _ in batch), tokenizer.encode_batch([t for _, t in batch]))
                batch = []
        if batch:
            yield from zip((d for d, _ in batch), tokenizer.encode_batch([t for _, t in batch]))

    for win in pack_token_docs(tokenized(), cfg, tokenizer.bos_id, tokenizer.eos_id, stats):
        stats.windows += 1
        stats.tokens += win.n_tokens
        stats.fill = stats.tokens / (stats.windows * cfg.window)
        yield win
