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

from kdcache.evaluate.needle_tasks import ADJECTIVES, NOUNS, Haystack, build_sample
from kdcache.formats.storage import atomic_write_bytes, resolve
from kdcache.replicate.presets import Preset, ReplicateError
from kdcache.replicate.store import save_json
from kdcache.replicate.teacher import shortest_passkey
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
        items.append(copy_item(rng))
        used += len(tok(" " + items[-1], add_special_tokens=False)["input_ids"])
    span = " ".join(items)
    return {"text": span + " " + span}


def write_short_corpus(path: str, teacher_dir: str, preset: Preset, seed: int) -> dict:
    """`preset.corpus_documents` documents of at most `doc_max_tokens` tokens (BOS and EOS
    included) as JSONL: built-in prose, `passkey_share` of passkey and `copy_share` of copying
    documents (shares of the documents). Returns the record corpus.json keeps."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    limit = preset.doc_max_tokens
    n_passkey = round(preset.passkey_share * preset.corpus_documents)
    n_copy = round(preset.copy_share * preset.corpus_documents)
    n_text = preset.corpus_documents - n_passkey - n_copy
    # the evaluation draws its keys from Random("0:passkey:..."): these strings never meet it
    rng = random.Random(f"kdcache-student-corpus-{seed}")
    kinds: dict[str, list[str]] = {"text": [], "passkey": [], "copy": []}
    dropped = {"text": 0, "passkey": 0, "copy": 0}
    tokens = {"text": 0, "passkey": 0, "copy": 0}

    def keep(kind: str, text: str) -> None:
        n = _n_tokens(tok, text)
        if n > limit:
            dropped[kind] += 1
            return
        kinds[kind].append(text)
        tokens[kind] += n

    for text in builtin_corpus(n_text * 2, seed=seed):
        if len(kinds["text"]) == n_text:
            break
        keep("text", text)
    shortest = shortest_passkey(tok)
    if n_passkey and shortest + 8 > limit:
        raise ReplicateError(f"doc_max_tokens {limit} is too short for a passkey document "
                             f"(the shortest takes {shortest + 8} tokens)")
    haystack = Haystack(tok)
    for kind, count in (("passkey", n_passkey), ("copy", n_copy)):
        for _ in range(10 * count):  # drops are rare (a re-tokenization longer than the ids)
            if len(kinds[kind]) == count:
                break
            doc = (passkey_document(tok, haystack, shortest, limit, rng) if kind == "passkey"
                   else copy_document(tok, limit, rng))
            keep(kind, doc["text"])
    order = [(kind, text) for kind, texts in kinds.items() for text in texts]
    rng.shuffle(order)
    fs, base = resolve(path)
    atomic_write_bytes(fs, base, "".join(json.dumps({"text": text}) + "\n"
                                         for _, text in order).encode())
    return {"path": path, "documents": len(order), "max_tokens": limit,
            "by_kind": {kind: {"documents": len(texts), "tokens": tokens[kind],
                               "dropped_longer": dropped[kind]}
                        for kind, texts in kinds.items()},
            "dropped_longer": sum(dropped.values())}


def split_heldout(corpus: str, train: str, heldout: str) -> dict:
    """Every HOLDOUT_FRACTION-th document of `corpus` into `heldout` (the documents the held-out
    perplexity and KL are measured on), the rest into `train` (what every dump packs). The
    split is by document, so no window of any dump, short or long, holds a held-out document."""
    fs, base = resolve(corpus)
    with fs.open(base, "rb") as fh:
        lines = [line for line in fh.read().decode().splitlines() if line.strip()]
    held = lines[HOLDOUT_FRACTION - 1::HOLDOUT_FRACTION]
    kept = [line for i, line in enumerate(lines) if i % HOLDOUT_FRACTION != HOLDOUT_FRACTION - 1]
    if not held or not kept:
        raise ReplicateError(f"{corpus}: {len(lines)} documents are too few to hold out one in "
                             f"{HOLDOUT_FRACTION}")
    for path, part in ((train, kept), (heldout, held)):
        fs, base = resolve(path)
        atomic_write_bytes(fs, base, ("\n".join(part) + "\n").encode())
    return {"train_documents": len(kept), "heldout_documents": len(held)}


def make_corpus(out: str, preset: dict, teacher: str, corpus: str | None) -> dict:
    """The students' corpus (built in, or the user's), split into training and held-out
    documents; its record lands at corpus_record(out)."""
    paths = corpus_paths(out)
    record: dict[str, Any] = {}
    source = corpus
    if source is None:
        source = os.path.join(out, "corpus-short.jsonl")
        record = write_short_corpus(source, teacher, Preset(**preset), seed=0)
    record.update(split_heldout(source, paths["train"], paths["heldout"]), source=source,
                  train=paths["train"], heldout=paths["heldout"])
    save_json(corpus_record(out), record)
    return record


def corpus_paths(out: str) -> dict[str, str]:
    return {"train": os.path.join(out, "corpus-train.jsonl"),
            "heldout": os.path.join(out, "corpus-heldout.jsonl")}


def corpus_record(out: str) -> str:
    return os.path.join(out, "corpus.json")
