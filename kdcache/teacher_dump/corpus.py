"""Corpus reading: stream `(doc_id, text)` documents from JSONL, Parquet or folders of `.txt` files.

Any local path or fsspec URL works (`s3://bucket/corpus/*.jsonl`, `memory://c.jsonl`). Files are
read one at a time and JSONL line by line, Parquet record batch by record batch, so a corpus larger
than memory streams through. `doc_id` is the document's position in the corpus stream (files in
sorted order), which makes it stable across runs and machines.

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

BUILTIN = "builtin"
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
    problems: list[str] = field(default_factory=list)  # first few, "file:line: what"

    def note(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.problems) < 20:
            self.problems.append(f"{where}: {kind}")

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
    if spec.path == BUILTIN:
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


def iter_documents(spec: CorpusSpec, stats: CorpusStats) -> Iterator[tuple[int, str]]:
    """Yield `(doc_id, text)` for every usable document; count the rest in `stats`."""
    if spec.path == BUILTIN:
        stats.files = 0
        for doc_id, text in enumerate(builtin_corpus(spec.builtin_documents, spec.builtin_seed)):
            stats.documents += 1
            yield doc_id, text
        return
    doc_id = 0
    for url, _ in list_corpus_files(spec):
        stats.files += 1
        for where, text in _iter_file(url, spec.text_field, stats):
            if text is None:
                continue
            if not text.strip():
                stats.note("empty", where)
                continue
            stats.documents += 1
            yield doc_id, text
            doc_id += 1


def _iter_file(url: str, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str | None]]:
    import fsspec

    kind = _kind_of(url)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if text_field not in pf.schema_arrow.names:
                raise CorpusError(f"{url}: no column {text_field!r} (columns: "
                                  f"{', '.join(pf.schema_arrow.names)}); use --text-field")
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
                value = obj.get(text_field) if isinstance(obj, dict) else None
                if not isinstance(value, str):
                    stats.note("undecodable", where)
                    yield where, None
                    continue
                yield where, value
    else:  # one document per .txt file
        with fsspec.open(url, "rb") as fh:
            data = fh.read()
        try:
            yield url, data.decode("utf-8")
        except UnicodeDecodeError:
            stats.note("undecodable", url)
            yield url, None


def corpus_fingerprint(spec: CorpusSpec) -> dict:
    """Identifies a corpus cheaply: file names, sizes and a hash of each file's head and tail.

    Hashing every byte of a large corpus would cost a full read before the dump starts; names,
    sizes and 64 KiB from each end catch edits, truncation and swapped files in practice.
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
            h.update(fh.read(65536))
            if size > 131072:
                fh.seek(size - 65536)
                h.update(fh.read(65536))
    return {"files": len(files), "bytes": sum(s for _, s in files), "xxh3": h.hexdigest(),
            "text_field": spec.text_field}


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

