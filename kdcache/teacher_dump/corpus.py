"""Corpus reading: stream `(doc_id, text)` documents from JSONL, Parquet or folders of `.txt` files.

Any local path or fsspec URL works (`s3://bucket/corpus/*.jsonl`, `memory://c.jsonl`). Files are
read one at a time and JSONL line by line, Parquet record batch by record batch, so a corpus larger
than memory streams through. `doc_id` is the document's position in the corpus stream (files in
sorted order), which makes it stable across runs and machines.

A record is a conversation instead of a text when it has no text field but OpenAI-style
`messages` or `prompt` / `response` fields (chat.py); it is yielded as a `Conversation`, which
the packer renders with the teacher's chat template.

Nothing is silently lost: documents that are empty, not decodable as UTF-8, not valid JSON, or
missing the text field are counted in `CorpusStats` (over-long documents are counted later, by the
packer, because only it knows their token length).

`builtin` names a small corpus generated deterministically here (no network, no files): short
synthetic documents made of grammar sentences and key-value facts that are restated later in the
document, so that a teacher trained on it for a minute has peaked, context-dependent predictions.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Iterator

from kdcache.errors import KdcacheError
from kdcache.teacher_dump.chat import ChatError, Conversation, conversation_from_record, is_chat_record

BUILTIN = "builtin"
BUILTIN_CHAT = "builtin-chat"  # the built-in documents as conversations (chat.py)
BUILTINS = (BUILTIN, BUILTIN_CHAT)
_TEXT_SUFFIXES = (".txt",)
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst", ".jsonl.bz2", ".jsonl.xz")
_PARQUET_SUFFIXES = (".parquet", ".pq")


class CorpusError(KdcacheError):
    """A corpus path that cannot be read (missing, unknown format, bad field name)."""


@dataclass
class CorpusStats:
    """What the reader saw; every document is counted in exactly one of these."""

    files: int = 0
    documents: int = 0  # yielded to the packer
    empty: int = 0  # text empty or whitespace only
    undecodable: int = 0  # invalid UTF-8, invalid JSON line, or text field missing / not a string
    bad_chat: int = 0  # a conversation record that is malformed (roles, contents, tools)
    chats: int = 0  # conversations among `documents`
    problems: list[str] = field(default_factory=list)  # first few, "file:line: what"

    def note(self, kind: str, where: str, why: str = "") -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.problems) < 20:
            self.problems.append(f"{where}: {kind}" + (f" ({why})" if why else ""))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CorpusSpec:
    """Where the documents come from. `path` is a file, folder, glob, URL, or `builtin`."""

    path: str
    text_field: str = "text"
    builtin_documents: int = 400  # size of the built-in corpus
    builtin_seed: int = 0


def list_corpus_files(spec: CorpusSpec) -> list[tuple[str, int]]:
    """Sorted (url, size) of the corpus files; for fingerprints and reading. Empty for builtin."""
    if spec.path in BUILTINS:
        return []
    import fsspec

    fs, root = fsspec.core.url_to_fs(spec.path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if any(ch in spec.path for ch in "*?["):
        paths = sorted(fs.glob(root))
    elif fs.isdir(root):
        paths = sorted(p for p in fs.find(root) if _kind_of(p) is not None)
    elif fs.exists(root):
        paths = [root]
    else:
        raise CorpusError(f"{spec.path}: corpus not found")
    if not paths:
        raise CorpusError(f"{spec.path}: no .jsonl, .parquet or .txt files found")
    out = []
    for p in paths:
        if _kind_of(p) is None:
            raise CorpusError(f"{p}: unknown corpus file type (expected .jsonl, .parquet or .txt)")
        info = fs.info(p)
        url = p if protocol in ("file", "local") else f"{protocol}://{p}"
        out.append((url, int(info.get("size") or 0)))
    return out


def _kind_of(path: str) -> str | None:
    low = path.lower()
    if low.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if low.endswith(_TEXT_SUFFIXES):
        return "text"
    return None


def iter_documents(spec: CorpusSpec,
                   stats: CorpusStats) -> Iterator[tuple[int, str | Conversation]]:
    """Yield `(doc_id, text or Conversation)` for every usable document; count the rest."""
    if spec.path in BUILTINS:
        stats.files = 0
        make = builtin_corpus if spec.path == BUILTIN else builtin_chat_corpus
        for doc_id, doc in enumerate(make(spec.builtin_documents, spec.builtin_seed)):
            stats.documents += 1
            stats.chats += isinstance(doc, Conversation)
            yield doc_id, doc
        return
    doc_id = 0
    for url, _ in list_corpus_files(spec):
        stats.files += 1
        for where, text in _iter_file(url, spec.text_field, stats):
            if text is None:
                continue
            if isinstance(text, Conversation):
                stats.chats += 1
            elif not text.strip():
                stats.note("empty", where)
                continue
            stats.documents += 1
            yield doc_id, text
            doc_id += 1


def _record_document(obj, text_field: str, where: str, stats: CorpusStats):
    """The text or Conversation of one JSON record, or None (counted in `stats`)."""
    value = obj.get(text_field) if isinstance(obj, dict) else None
    if isinstance(value, str):
        return value
    if value is None and is_chat_record(obj):
        try:
            return conversation_from_record(obj)
        except ChatError as exc:
            stats.note("bad_chat", where, str(exc))
            return None
    stats.note("undecodable", where)
    return None


_CHAT_COLUMNS = ("messages", "tools", "prompt", "response", "completion")


def _iter_file(url: str, text_field: str,
               stats: CorpusStats) -> Iterator[tuple[str, str | Conversation | None]]:
    import fsspec

    kind = _kind_of(url)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            if text_field not in names and ("messages" in names or "prompt" in names):
                columns = [c for c in _CHAT_COLUMNS if c in names]
                for row, obj in enumerate(r for b in pf.iter_batches(columns=columns,
                                                                     batch_size=1024)
                                          for r in b.to_pylist()):
                    where = f"{url}:row {row}"
                    obj = {k: v for k, v in obj.items() if v is not None}
                    yield where, _record_document(obj, text_field, where, stats)
                return
            if text_field not in names:
                raise CorpusError(f"{url}: no column {text_field!r} (columns: "
                                  f"{', '.join(names)}); use --text-field")
            row = 0
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    where = f"{url}:row {row}"
                    row += 1
                    if not isinstance(value, str):
                        stats.note("undecodable" if value is not None else "empty", where)
                        yield where, None
                    else:
                        yield where, value
    elif kind == "jsonl":
        with fsspec.open(url, "rb", compression="infer") as fh:
            for lineno, raw in enumerate(fh, start=1):
                where = f"{url}:{lineno}"
                if not raw.strip():
                    continue  # blank lines separate nothing in JSONL; not a document
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    stats.note("undecodable", where)
                    yield where, None
                    continue
                yield where, _record_document(obj, text_field, where, stats)
    else:  # one document per .txt file
        with fsspec.open(url, "rb") as fh:
            data = fh.read()
        try:
            yield url, data.decode("utf-8")
        except UnicodeDecodeError:
            stats.note("undecodable", url)
            yield url, None


def corpus_fingerprint(spec: CorpusSpec) -> dict:
    """Identifies a corpus: file names, sizes and an xxh3 of every byte of every file.

    The plan pass tokenizes the whole corpus anyway, and xxh3 runs at memory speed, so hashing
    all of it costs little; anything less lets an edit between a kill and its resume mix old and
    new text in one dataset.
    """
    import xxhash

    if spec.path == BUILTIN:
        return {"builtin": {"documents": spec.builtin_documents, "seed": spec.builtin_seed,
                            "generator": _BUILTIN_VERSION}, "text_field": spec.text_field}
    import fsspec

    h = xxhash.xxh3_64()
    files = list_corpus_files(spec)
    for url, size in files:
        h.update(f"{url.rsplit('/', 1)[-1]}\0{size}\0".encode())
        with fsspec.open(url, "rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                h.update(block)
    return {"files": len(files), "bytes": sum(s for _, s in files), "xxh3": h.hexdigest(),
            "text_field": spec.text_field}


_HASH_BLOCK = 8 << 20


# ----------------------------------------------------------------------------- built-in corpus

_BUILTIN_VERSION = 1
_NAMES = ("alice bob carol dave erin frank grace heidi ivan judy mallory nia oscar peggy quinn "
          "rupert sybil trent uma victor wendy xena yusuf zoe").split()
_NOUNS = ("river mountain city garden engine library market forest harbor bridge tower valley "
          "village castle island desert lantern violin kettle compass orchard meadow window "
          "ladder mirror signal").split()
_ADJS = ("quiet bright ancient narrow golden hidden northern gentle rapid silver broken distant "
         "crowded empty famous").split()
_VERBS = ("visits paints repairs crosses watches guards builds finds studies measures").split()
_TOPICS = ("weather travel cooking music history science trade farming").split()


def _sentence(rng: random.Random) -> str:
    a, b = rng.choice(_NAMES).capitalize(), rng.choice(_NOUNS)
    pattern = rng.randrange(4)
    if pattern == 0:
        return f"{a} {rng.choice(_VERBS)} the {rng.choice(_ADJS)} {b}."
    if pattern == 1:
        return f"The {rng.choice(_ADJS)} {b} is near the {rng.choice(_NOUNS)}."
    if pattern == 2:
        n = rng.randrange(2, 9)
        return f"{a} counts {n} {b}s, then {n + 1} {b}s, then {n + 2} {b}s."
    return f"In the {rng.choice(_ADJS)} {b}, {a} talks about {rng.choice(_TOPICS)}."


def builtin_document(rng: random.Random) -> str:
    """One synthetic document: a title, sentences, facts stated once and recalled later."""
    facts = {rng.choice(_NAMES): rng.randrange(100, 1000) for _ in range(rng.randrange(1, 4))}
    parts = [f"Notes on the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}."]
    for name, code in facts.items():
        parts.append(f"The code of {name} is {code}.")
    for _ in range(rng.randrange(2, 24)):
        parts.append(_sentence(rng))
    for name, code in facts.items():
        parts.append(f"Recall: the code of {name} is {code}.")
    return " ".join(parts)


def builtin_corpus(n_documents: int, seed: int = 0) -> Iterator[str]:
    """`n_documents` synthetic documents, identical for the same seed on every machine."""
    rng = random.Random(f"kdcache-builtin-{_BUILTIN_VERSION}-{seed}")
    for _ in range(n_documents):
        yield builtin_document(rng)


def builtin_conversation(rng: random.Random) -> Conversation:
    """A conversation about one built-in document: the user shares notes and asks for a code
    stated in them; sometimes a second question, sometimes answered through a tool call."""
    facts = {rng.choice(_NAMES): rng.randrange(100, 1000) for _ in range(rng.randrange(1, 4))}
    notes = [f"Notes on the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}."]
    notes += [f"The code of {name} is {code}." for name, code in facts.items()]
    notes += [_sentence(rng) for _ in range(rng.randrange(1, 8))]
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": "Answer from the notes, briefly."})
    names = list(facts)
    first = rng.choice(names)
    messages += [{"role": "user", "content": " ".join(notes) + f" What is the code of {first}?"},
                 {"role": "assistant", "content": f"The code of {first} is {facts[first]}."}]
    tools = None
    if rng.random() < 0.3:
        other = rng.choice(_NAMES)
        code = rng.randrange(100, 1000)
        tools = ({"type": "function", "function": {"name": "lookup_code",
                                                   "parameters": {"name": "string"}}},)
        messages += [{"role": "user", "content": f"Look up the code of {other}."},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"type": "function", "function": {"name": "lookup_code",
                                                           "arguments": {"name": other}}}]},
                     {"role": "tool", "content": str(code)},
                     {"role": "assistant", "content": f"The code of {other} is {code}."}]
    elif len(names) > 1 and rng.random() < 0.5:
        second = rng.choice([n for n in names if n != first])
        messages += [{"role": "user", "content": f"And {second}?"},
                     {"role": "assistant", "content": f"The code of {second} is {facts[second]}."}]
    return Conversation(messages=tuple(messages), tools=tools)


def builtin_chat_corpus(n_conversations: int, seed: int = 0) -> Iterator[Conversation]:
    """`n_conversations` synthetic conversations, identical for the same seed everywhere."""
    rng = random.Random(f"kdcache-builtin-chat-{_BUILTIN_VERSION}-{seed}")
    for _ in range(n_conversations):
        yield builtin_conversation(rng)

