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
- Conversations (chat.py) are rendered with the teacher's chat template and carry a per-token
  target mask; one that the template rejects, or that does not fit a window, is dropped and
  counted (cutting a conversation would leave turns without their context).

The same corpus, tokenizer, window, seed and buffer size always give the same windows, which is
what lets the runner plan shards up front and resume by shard name.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.teacher_dump.chat import ChatError, ChatRenderer, Conversation, TARGET_POLICIES


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
    targets: str = "auto"  # which tokens of a conversation get targets (chat.TARGET_POLICIES)

    def __post_init__(self) -> None:
        if self.targets not in TARGET_POLICIES:
            raise PackingError(f"targets must be one of {', '.join(TARGET_POLICIES)}, "
                               f"got {self.targets!r}")
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
    # bool [n]: True where the token is a target token (its row's predecessor gets a target);
    # None: every token is (plain text)
    target_mask: np.ndarray | None = None

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
    chats: int = 0  # conversations packed
    rejected_chats: int = 0  # conversations the template rejected or that cannot be masked
    dropped_long_chats: int = 0  # conversations longer than the window (never split)
    target_tokens: int = 0  # tokens that are targets (all tokens for plain text)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- tokenizer


class TeacherTokenizer:
    """The teacher's tokenizer (a HF tokenizer directory) with the BOS/EOS ids packing uses."""

    def __init__(self, model_dir: str, bos_id: int | None = None, eos_id: int | None = None):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if not os.path.isdir(model_dir):
            raise PackingError(f"{model_dir}: teacher model directory not found")
        # With a tokenizer.json, exactly it (the generic fast class): AutoTokenizer picks the
        # class tokenizer_config.json names, which may rebuild another pipeline from vocab files
        # (other tokens for the same text under the same recorded hash).
        loader = PreTrainedTokenizerFast if _has_tokenizer_json(model_dir) else AutoTokenizer
        try:
            self.tok = loader.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise PackingError(f"{model_dir}: cannot load the teacher's tokenizer: {exc}") from None
        self.bos_id = bos_id if bos_id is not None else self.tok.bos_token_id
        self.eos_id = eos_id if eos_id is not None else self.tok.eos_token_id
        if self.eos_id is None:
            raise PackingError(f"{model_dir}: the tokenizer has no EOS token; pass --eos-id")
        self.vocab_hash = tokenizer_hash(model_dir)
        self._renderers: dict[str, ChatRenderer] = {}

    def render_chat(self, conv: Conversation, targets: str):
        """Token ids (no BOS) and target mask of a conversation under a target policy."""
        policy = "assistant" if targets == "auto" else targets
        if policy not in self._renderers:
            try:
                self._renderers[policy] = ChatRenderer(self.tok, self.bos_id, policy)
            except ChatError as exc:  # the teacher, not one conversation, is the problem
                raise PackingError(f"the corpus holds conversations but {exc}") from None
        return self._renderers[policy].render(conv)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]


# What the generic fast tokenizer reads beside tokenizer.json (special tokens, chat template).
_FAST_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _has_tokenizer_json(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, "tokenizer.json"))


def tokenizer_files(model_dir: str) -> list[str]:
    """The files TeacherTokenizer loads: two dumps with equal hashes of them tokenize alike."""
    names = sorted(os.listdir(model_dir))
    if _has_tokenizer_json(model_dir):
        return [n for n in names if n in _FAST_TOKENIZER_FILES]
    return [n for n in names if n.startswith(("tokenizer", "chat_template")) or n in (
        "vocab.json", "vocab.txt", "merges.txt", "special_tokens_map.json", "added_tokens.json")]


def tokenizer_hash(model_dir: str) -> str:
    """xxh3 of the tokenizer files TeacherTokenizer loads (tokenizer_files)."""
    import xxhash

    h = xxhash.xxh3_64()
    for name in tokenizer_files(model_dir):
        with open(os.path.join(model_dir, name), "rb") as fh:
            h.update(name.encode() + b"\0" + fh.read())
    return h.hexdigest()


# ---------------------------------------------------------------------------- packing


def _wrap(ids: list[int], bos: int | None, eos: int) -> np.ndarray:
    head = [bos] if bos is not None else []
    return np.asarray(head + list(ids) + [eos], dtype=np.int32)


def _wrap_mask(mask: np.ndarray, bos: int | None) -> np.ndarray:
    """A conversation's target mask over BOS + ids + EOS (the added BOS/EOS are not targets)."""
    head = np.zeros(1 if bos is not None else 0, dtype=bool)
    return np.concatenate([head, np.asarray(mask, dtype=bool), np.zeros(1, dtype=bool)])


class _WindowBuilder:
    def __init__(self, window: int) -> None:
        self.window = window
        self.next_index = 0
        self._reset()

    def _reset(self) -> None:
        self.parts: list[np.ndarray] = []
        self.masks: list[np.ndarray | None] = []
        self.doc_ids: list[int] = []
        self.pieces: list[int] = []
        self.used = 0

    def fits(self, n: int) -> bool:
        return self.used + n <= self.window

    def add(self, tokens: np.ndarray, doc_id: int, piece: int,
            mask: np.ndarray | None = None) -> None:
        self.parts.append(tokens)
        self.masks.append(mask)
        self.doc_ids.append(doc_id)
        self.pieces.append(piece)
        self.used += len(tokens)

    def close(self) -> PackedWindow | None:
        if not self.parts:
            return None
        lengths = np.fromiter((len(p) for p in self.parts), dtype=np.int64, count=len(self.parts))
        target_mask = None
        if any(m is not None for m in self.masks):
            target_mask = np.concatenate([np.ones(len(p), dtype=bool) if m is None else m
                                          for p, m in zip(self.parts, self.masks)])
        win = PackedWindow(
            window_index=self.next_index, tokens=np.concatenate(self.parts),
            doc_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            doc_ids=np.asarray(self.doc_ids, dtype=np.int64),
            doc_pieces=np.asarray(self.pieces, dtype=np.int32), target_mask=target_mask)
        self.next_index += 1
        self._reset()
        return win


def pack_token_docs(docs: Iterable[tuple], cfg: PackConfig, bos: int | None,
                    eos: int, stats: PackStats) -> Iterator[PackedWindow]:
    """Pack already tokenized documents (no special tokens) into windows: `(doc_id, ids)` for
    text, `(doc_id, ids, target_mask)` for a rendered conversation."""
    builder = _WindowBuilder(cfg.window)
    buffer: list[tuple] = []
    buffer_no = 0

    def flush_buffer() -> Iterator[PackedWindow]:
        nonlocal buffer_no
        rng = np.random.default_rng([cfg.seed, buffer_no])
        buffer_no += 1
        for j in rng.permutation(len(buffer)):
            doc_id, ids, *rest = buffer[j]
            tokens = _wrap(ids, bos, eos)
            mask = _wrap_mask(rest[0], bos) if rest else None
            if mask is not None and len(tokens) > cfg.window:
                stats.dropped_long_chats += 1
                if len(stats.problems) < 20:
                    stats.problems.append(f"doc {doc_id}: conversation of {len(tokens)} tokens > "
                                          f"window {cfg.window}, dropped")
                continue
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
                    stats.target_tokens += len(tokens[start:start + cfg.window])
                    yield builder.close()
                continue
            stats.documents += 1
            stats.chats += mask is not None
            stats.target_tokens += int(mask.sum()) if mask is not None else len(tokens)
            if not builder.fits(len(tokens)):
                yield builder.close()
            builder.add(tokens, doc_id, 0, mask)
        buffer.clear()

    for item in docs:
        buffer.append(item)
        if len(buffer) >= cfg.shuffle_buffer:
            yield from flush_buffer()
    if buffer:
        yield from flush_buffer()
    if (w := builder.close()) is not None:
        yield w


def pack_documents(texts: Iterable[tuple[int, str | Conversation]], tokenizer: TeacherTokenizer,
                   cfg: PackConfig, stats: PackStats) -> Iterator[PackedWindow]:
    """Tokenize `(doc_id, text)` documents in batches (conversations one by one, through the
    chat template) and pack them; counts go to `stats`."""
    targets = cfg.targets

    def encode(batch: list[tuple[int, str | Conversation]]) -> Iterator[tuple]:
        plain = [t for _, t in batch if isinstance(t, str)]
        encoded = iter(tokenizer.encode_batch(plain) if plain else [])
        for doc_id, item in batch:
            if isinstance(item, str):
                ids = next(encoded)
                if targets == "all" or targets == "auto":
                    yield doc_id, ids
                else:  # a response-only policy gives plain text no targets: say so, count it
                    stats.rejected_chats += 1
                    if len(stats.problems) < 20:
                        stats.problems.append(f"doc {doc_id}: plain text has no assistant turns "
                                              f"for --targets {targets}, dropped")
                continue
            try:
                rendered = tokenizer.render_chat(item, targets)
            except ChatError as exc:
                stats.rejected_chats += 1
                if len(stats.problems) < 20:
                    stats.problems.append(f"doc {doc_id}: {exc}")
                continue
            yield doc_id, rendered.ids, rendered.target_mask

    def tokenized() -> Iterator[tuple]:
        batch: list[tuple[int, str | Conversation]] = []
        for item in texts:
            batch.append(item)
            if len(batch) >= cfg.tokenize_batch:
                yield from encode(batch)
                batch = []
        if batch:
            yield from encode(batch)

    for win in pack_token_docs(tokenized(), cfg, tokenizer.bos_id, tokenizer.eos_id, stats):
        stats.windows += 1
        stats.tokens += win.n_tokens
        stats.fill = stats.tokens / (stats.windows * cfg.window)
        yield win
