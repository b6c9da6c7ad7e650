"""The students' corpus: short documents only (at most `doc_max_tokens` tokens, BOS and EOS
included), built-in prose with a share of retrieval documents mixed in.

The paper's student was pretrained at scale and could already retrieve within a short document;
the experiment asks whether that retrieval extends past the document length. Our students start
from random weights, and from built-in prose alone they never learn to retrieve at all (H200,
2026-12-02: all 27 toy students 0.00 at every distance, 64 tokens included), so nothing about
distance could be tested. Two kinds of retrieval document, each within the length limit:

- passkey: the evaluation's own prompt (needle_tasks.build_sample, keys from this corpus's seed,
  never the evaluation's), of a length drawn between the shortest prompt and the limit, at a
  random depth, followed by its answer " 12345." as the evaluation scores it;
- copy: random words and 5-digit numbers, then the same again, of a length drawn per document:
  the repeat's tokens are induction targets, the dense signal an induction head forms from
  (teacher.py: sparse answer labels alone leave small models on a plateau).

Documents are stored as text (the dump tokenizes them); a retrieval document whose text,
re-tokenized with BOS and EOS, is over the limit is dropped and counted. The kinds are
interleaved in a seeded order, so every window mixes them (the held-out documents too: their
perplexity is over all three kinds).

The corpus step (`make_corpus`, a task of its own) writes it, or takes the user's, and splits
one document in HOLDOUT_FRACTION off before any dump packs it (`split_heldout`).
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from kdcache.evaluate.needle_tasks import (ADJECTIVES, NOUNS, Haystack, build_sample,
                                           shortest_passkey)
from kdcache.formats.storage import atomic_write_bytes, resolve
from kdcache.replicate.presets import Preset, ReplicateError
from kdcache.replicate.store import save_json
from kdcache.teacher_dump.corpus import builtin_corpus

HOLDOUT_FRACTION = 8  # one document in 8 is never trained on (held-out perplexity and KL)
COPY_MIN_WORDS = 4  # the shortest copied span (the teacher's copy rows: 8-64 tokens)
WORDS = ADJECTIVES + NOUNS


def _n_tokens(tok: Any, text: str) -> int:
    """Tokens of `text` as the dump packs it: BOS + text + EOS."""
    return len(tok(text, add_special_tokens=False)["input_ids"]) + 2


def passkey_document(tok: Any, haystack: Haystack, shortest: int, limit: int,
                     rng: random.Random) -> dict:
    """A passkey prompt of a random length (`shortest` to fit `limit`) and depth, then its
    answer, as text ("key": the key)."""
    answer_room = 8  # EOS and " 12345." (7 bytes: at most 7 byte-level tokens)
    length = rng.randint(shortest, limit - answer_room)
    sample = build_sample(tok, haystack, "passkey", "numbers", length, rng.random(), rng)
    ids = list(sample.input_ids)
    if tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]:
        ids = ids[1:]  # the dump adds BOS itself
    key = sample.answers[0]
    return {"text": tok.decode(ids) + " " + key + ".", "key": key,
            "distance": sample.distance}


def copy_item(rng: random.Random) -> str:
    """A word or a 5-digit number, half and half: a number's digits are separate tokens that
    only a copy can predict (a word's later tokens follow from its first), and copying digits is
    what a passkey answer is."""
    return rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(10_000, 99_999))


def copy_document(tok: Any, limit: int, rng: random.Random) -> dict:
    """Random items (copy_item), then the same items again; the span's length drawn up to half
    the limit."""
    budget = rng.randint(4 * COPY_MIN_WORDS, limit - 2) // 2
    items: list[str] = []
    used = 0
    while len(items) < COPY_MIN_WORDS or used < budget:
        chunk = [copy_item(rng) for _ in range(32)]  # tokenized in one call: 5x faster
        lengths = tok([" " + item for item in chunk], add_special_tokens=False)["input_ids"]
        for item, ids in zip(chunk, lengths):
            if len(items) >= COPY_MIN_WORDS and used >= budget:
                break
            items.append(item)
            used += len(ids)
    span = " ".join(items)
    return {"text": span + " " + span}


KINDS = ("text", "passkey", "copy")  # the corpus's kinds of document, in its record's order


class DocumentSource:
    """The students' kinds of document, one at a time, as text: built-in prose (`text`),
    passkey and copying documents of at most `limit` tokens (BOS and EOS included). The corpus
    step writes a fixed number of each; the teachers train on fresh ones of the same kinds (a
    teacher that never saw them predicts them badly, and KD students distil that)."""

    def __init__(self, tok: Any, limit: int, seed: str, prose_seed: int) -> None:
        self.tok, self.limit = tok, limit
        self.rng = random.Random(seed)
        self.prose = builtin_corpus(1 << 62, seed=prose_seed)  # lazy: as many as asked for
        self.shortest = shortest_passkey(tok)
        self.haystack: Haystack | None = None

    def shortest_document(self, kind: str) -> int:
        """Tokens of the shortest document of `kind` (passkey: the prompt, EOS and " 12345.")."""
        return {"text": 2, "passkey": self.shortest + 8, "copy": 4 * COPY_MIN_WORDS + 2}[kind]

    def fits(self, kind: str) -> bool:
        return self.shortest_document(kind) <= self.limit

    def draw(self, kind: str) -> str:
        """One document of `kind` (which must fit the limit: fits(kind))."""
        if kind == "text":
            return next(self.prose)
        if kind == "passkey":
            if self.haystack is None:
                self.haystack = Haystack(self.tok)
            return passkey_document(self.tok, self.haystack, self.shortest, self.limit,
                                    self.rng)["text"]
        if kind == "copy":
            return copy_document(self.tok, self.limit, self.rng)["text"]
        raise ReplicateError(f"unknown document kind {kind!r}; kinds: {', '.join(KINDS)}")


def document_mix(preset: Preset) -> dict[str, Any]:
    """The students' kinds of document as the teachers train on them (JSON: it travels to the
    teachers' task processes): the length limit and each kind's share of the documents."""
    return {"limit": preset.doc_max_tokens, "passkey_share": preset.passkey_share,
            "copy_share": preset.copy_share}


def kind_counts(total: int, passkey_share: float, copy_share: float) -> dict[str, int]:
    """Documents of each kind among `total` (shares of the documents)."""
    n_passkey, n_copy = round(passkey_share * total), round(copy_share * total)
    return {"text": total - n_passkey - n_copy, "passkey": n_passkey, "copy": n_copy}


def write_short_corpus(path: str, teacher_dir: str, preset: Preset, seed: int) -> dict:
    """`preset.corpus_documents` documents of at most `doc_max_tokens` tokens (BOS and EOS
    included) as JSONL (`text` and `kind`): built-in prose, `passkey_share` of passkey and
    `copy_share` of copying documents (shares of the documents). Returns the record
    corpus.json keeps."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    limit = preset.doc_max_tokens
    counts = kind_counts(preset.corpus_documents, preset.passkey_share, preset.copy_share)
    # the evaluation draws its keys from Random("0:passkey:..."): these strings never meet it
    source = DocumentSource(tok, limit, f"kdcache-student-corpus-{seed}", prose_seed=seed)
    for kind, name in (("passkey", "passkey"), ("copy", "copying")):
        if counts[kind] and not source.fits(kind):
            raise ReplicateError(f"doc_max_tokens {limit} is too short for a {name} document "
                                 f"(the shortest takes {source.shortest_document(kind)} tokens)")
    kinds: dict[str, list[str]] = {kind: [] for kind in KINDS}
    dropped = {kind: 0 for kind in KINDS}
    tokens = {kind: 0 for kind in KINDS}
    for kind in KINDS:
        # drops are rare (prose longer than the limit, a re-tokenization longer than the ids)
        for _ in range(10 * counts[kind]):
            if len(kinds[kind]) == counts[kind]:
                break
            text = source.draw(kind)
            n = _n_tokens(tok, text)
            if n > limit:
                dropped[kind] += 1
                continue
            kinds[kind].append(text)
            tokens[kind] += n
    order = [(kind, text) for kind, texts in kinds.items() for text in texts]
    source.rng.shuffle(order)
    fs, base = resolve(path)
    atomic_write_bytes(fs, base, "".join(json.dumps({"text": text, "kind": kind}) + "\n"
                                         for kind, text in order).encode())
    return {"path": path, "documents": len(order), "max_tokens": limit,
            "by_kind": {kind: {"documents": len(texts), "tokens": tokens[kind],
                               "dropped_longer": dropped[kind]}
                        for kind, texts in kinds.items()},
            "dropped_longer": sum(dropped.values())}


def heldout_kinds(preset: Preset, corpus: str | None) -> tuple[str, ...]:
    """What the held-out documents are split by: each kind of the built-in corpus that has
    documents to hold out (metrics per kind: a teacher can be right about prose and wrong about
    retrieval documents), or ("all",) for the user's corpus, whose kinds are not known."""
    if corpus is not None:
        return ("all",)
    counts = kind_counts(preset.corpus_documents, preset.passkey_share, preset.copy_share)
    return tuple(kind for kind in KINDS if counts[kind] >= HOLDOUT_FRACTION)


def _line_kind(line: str) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("kind") if isinstance(record, dict) else None


def split_heldout(corpus: str, train: str, heldout: dict[str, str]) -> dict:
    """Every HOLDOUT_FRACTION-th document of `corpus` into a held-out file (the documents the
    held-out perplexity and KL are measured on), the rest into `train` (what every dump packs).
    `heldout`: {"all": path}, or a path per kind (every HOLDOUT_FRACTION-th document of each
    kind; a kind not named is trained on whole). The split is by document, so no window of any
    dump, short or long, holds a held-out document."""
    fs, base = resolve(corpus)
    with fs.open(base, "rb") as fh:
        lines = [line for line in fh.read().decode().splitlines() if line.strip()]
    held: dict[str, list[str]] = {name: [] for name in heldout}
    kept: list[str] = []
    seen: dict[str, int] = {}
    for line in lines:
        name = "all" if "all" in heldout else _line_kind(line)
        if name not in held:
            kept.append(line)
            continue
        seen[name] = seen.get(name, 0) + 1
        (held[name] if seen[name] % HOLDOUT_FRACTION == 0 else kept).append(line)
    empty = [name for name, part in held.items() if not part]
    if empty or not kept:
        raise ReplicateError(f"{corpus}: {len(lines)} documents are too few to hold out one in "
                             f"{HOLDOUT_FRACTION}" + (f" of each of {', '.join(empty)}"
                                                     if empty and "all" not in held else ""))
    for path, part in ((train, kept), *((heldout[name], held[name]) for name in heldout)):
        fs, base = resolve(path)
        atomic_write_bytes(fs, base, ("\n".join(part) + "\n").encode())
    return {"train_documents": len(kept),
            "heldout_documents": sum(len(part) for part in held.values()),
            "heldout_by_kind": {name: len(part) for name, part in held.items()}}


def make_corpus(out: str, preset: dict, teacher: str, corpus: str | None) -> dict:
    """The students' corpus (built in, or the user's), split into training and held-out
    documents; its record lands at corpus_record(out)."""
    kinds = heldout_kinds(Preset(**preset), corpus)
    paths = corpus_paths(out, kinds)
    record: dict[str, Any] = {}
    source = corpus
    if source is None:
        source = os.path.join(out, "corpus-short.jsonl")
        record = write_short_corpus(source, teacher, Preset(**preset), seed=0)
    record.update(split_heldout(source, paths["train"], paths["heldout"]), source=source,
                  train=paths["train"], heldout=paths["heldout"])
    save_json(corpus_record(out), record)
    return record


def corpus_paths(out: str, kinds: tuple[str, ...]) -> dict[str, Any]:
    """The training documents' file, and the held-out documents' file of each of `kinds`."""
    return {"train": os.path.join(out, "corpus-train.jsonl"),
            "heldout": {kind: os.path.join(out, "corpus-heldout.jsonl" if kind == "all"
                                           else f"corpus-heldout-{kind}.jsonl")
                        for kind in kinds}}


def corpus_record(out: str) -> str:
    return os.path.join(out, "corpus.json")
