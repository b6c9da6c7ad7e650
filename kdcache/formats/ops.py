"""Dataset operations: subset, merge, reshard, reencode. Each reads finished datasets, writes a new
one through DatasetWriter (shards atomic, manifest last), verifies it, and records its lineage.

Targets are copied bit for bit whenever the output keeps the source's codec and codec table (subset,
reshard, and merge of datasets coded alike): the codec blobs move unchanged. Otherwise they are
decoded and encoded again (reencode; merge of datasets with different tables), which for a lossy
codec (qrank) quantises once more; the lineage entry says which happened and, for reencode, how
far the new targets are from the old.

Lineage: `manifest.extra.lineage` is a list of steps, oldest first, each naming the operation, its
parameters and every source (path, the xxh3 of its manifest.json, teacher, windows, codec); a
dataset made from made datasets carries its sources' lineage before its own step.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np
import xxhash

from kdcache import __version__
from kdcache.errors import ConfigMismatchError, FormatError, KdcacheError
from kdcache.formats import storage
from kdcache.formats.codecs import available_codecs, make_codec
from kdcache.formats.manifest import MANIFEST_NAME, DatasetHeader
from kdcache.formats.reader import LogitDataset, open_dataset
from kdcache.formats.verify import verify_dataset
from kdcache.formats.window import WindowRecord
from kdcache.formats.writer import DatasetWriter

# Packing settings that describe how windows were filled, not what a window means: datasets that
# differ only in these can be merged.
_PACKING_FREE = frozenset({"seed", "shuffle_buffer", "windows_per_shard"})


class OperationError(KdcacheError):
    """A dataset operation's arguments are invalid or its sources cannot be combined."""


@dataclass
class OperationResult:
    out: str
    operation: str
    windows: int
    tokens: int
    shards: int
    targets: str  # "copied" (codec blobs unchanged) | "re-encoded" | "mixed"
    verified: bool
    lineage: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"out": self.out, "operation": self.operation, "windows": self.windows,
                "tokens": self.tokens, "shards": self.shards, "targets": self.targets,
                "verified": self.verified, "stats": self.stats}


# ------------------------------------------------------------------------- selections

def parse_ranges(text: str, *, what: str, limit: int | None = None) -> list[int]:
    """"0:4,10,12:14" -> [0, 1, 2, 3, 10, 12, 13] (half-open ranges like Python slices, sorted,
    unique). Refuses negatives, empty ranges and values at or above `limit`."""
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if ":" in part:
                a, b = part.split(":", 1)
                lo, hi = int(a) if a else 0, int(b) if b else limit
                if hi is None:
                    raise ValueError
                values = range(lo, hi)
            else:
                values = range(int(part), int(part) + 1)
        except ValueError:
            raise OperationError(f"{what}: cannot read {part!r}; use N, A:B (A..B-1) or A: "
                                 "separated by commas") from None
        if values.start < 0 or len(values) == 0:
            raise OperationError(f"{what}: {part!r} is empty or negative")
        if limit is not None and values.stop > limit:
            raise OperationError(f"{what}: {part!r} goes past the last one ({limit - 1})")
        out.update(values)
    if not out:
        raise OperationError(f"{what}: nothing selected")
    return sorted(out)


def windows_with_documents(ds: LogitDataset, doc_ids: set[int]) -> list[int]:
    """Windows (indices in manifest order) holding a segment of any of these documents."""
    picked = []
    for i in range(len(ds)):
        s, j = ds.locate(i)
        if doc_ids.intersection(ds.shard(s).fields(j)["doc_ids"].tolist()):
            picked.append(i)
    return picked


# ------------------------------------------------------------------------- lineage

def _manifest_xxh3(ds: LogitDataset) -> str:
    data = storage.read_bytes(ds.fs, storage.join(ds.base, MANIFEST_NAME))
    return xxhash.xxh3_64(data).hexdigest()


def source_entry(ds: LogitDataset) -> dict[str, Any]:
    return {"path": ds.root, "manifest_xxh3": _manifest_xxh3(ds),
            "teacher": ds.header.teacher.get("name"), "windows": len(ds),
            "tokens": int(ds.manifest["totals"]["tokens"]), "codec": ds.header.codec,
            "k": ds.header.k}


def lineage_step(operation: str, sources: list[LogitDataset], params: dict[str, Any],
                 targets: str) -> list[dict[str, Any]]:
    """The sources' own lineage (the first source's, then any other's not already in it), then
    this step."""
    chain: list[dict[str, Any]] = []
    for ds in sources:
        for step in ds.header.extra.get("lineage", []):
            if step not in chain:
                chain.append(step)
    chain.append({
        "operation": operation, "params": params, "targets": targets,
        "sources": [source_entry(ds) for ds in sources],
        "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "by": f"kdcache {__version__}",
    })
    return chain


# ------------------------------------------------------------------------- checks

def _check_out(out: str, sources: list[LogitDataset]) -> None:
    fs, base = storage.resolve(out)
    for ds in sources:
        if ds.base == base and ds.fs.protocol == fs.protocol:
            raise OperationError(f"{out}: is a source of this operation; write elsewhere")
    if fs.exists(storage.join(base, MANIFEST_NAME)):
        raise OperationError(f"{out}: already holds a finished dataset; choose another --out")


def _teacher_identity(header: DatasetHeader) -> dict[str, Any]:
    return {k: v for k, v in header.teacher.items() if k != "path"}


def check_mergeable(sources: list[LogitDataset]) -> None:
    """Same teacher (everything but its path), same targets (kind, k, vocab, temperature) and the
    same packing (everything but how windows were filled): else ConfigMismatchError naming the
    first difference."""
    first = sources[0]
    a_pack = {k: v for k, v in first.header.packing.items() if k not in _PACKING_FREE}
    for ds in sources[1:]:
        diffs = []
        for name, x, y in (("kind", first.kind, ds.kind), ("k", first.k, ds.k),
                           ("vocab_size", first.vocab_size, ds.vocab_size),
                           ("temperature", first.header.temperature, ds.header.temperature)):
            if x != y:
                diffs.append(f"targets.{name}: {x!r} vs {y!r}")
        ta, tb = _teacher_identity(first.header), _teacher_identity(ds.header)
        for key in sorted(set(ta) | set(tb)):
            if ta.get(key) != tb.get(key):
                diffs.append(f"teacher.{key}: {ta.get(key)!r} vs {tb.get(key)!r}")
        b_pack = {k: v for k, v in ds.header.packing.items() if k not in _PACKING_FREE}
        for key in sorted(set(a_pack) | set(b_pack)):
            if a_pack.get(key) != b_pack.get(key):
                diffs.append(f"packing.{key}: {a_pack.get(key)!r} vs {b_pack.get(key)!r}")
        if diffs:
            raise ConfigMismatchError(
                f"cannot merge {ds.root} into {first.root}: datasets merged must share teacher, "
                "targets and packing. Differences:\n  " + "\n  ".join(diffs))


def same_coding(a: LogitDataset, b: LogitDataset) -> bool:
    """Whether b's codec blobs mean the same under a's codec: same codec, parameters, table."""
    return (a.header.codec == b.header.codec and a.codec.config() == b.codec.config()
            and a.codec.table == b.codec.table and a.k == b.k and a.kind == b.kind
            and a.vocab_size == b.vocab_size)


# ------------------------------------------------------------------------- the copy loop

def _record(fields: dict[str, Any], index: int, ids=None, values=None) -> WindowRecord:
    return WindowRecord(window_index=index, tokens=fields["tokens"],
                        doc_offsets=fields["doc_offsets"], valid=fields["valid"], ids=ids,
                        values=values, doc_ids=fields["doc_ids"], doc_pieces=fields["doc_pieces"])


def _decoded_record(ds: LogitDataset, fields: dict[str, Any], index: int,
                    where: str) -> WindowRecord:
    w = ds.decode_window(fields, where=where)
    values = w.logprobs if w.logprobs is not None else w.weights
    return _record(fields, index, ids=w.ids.numpy(), values=values.numpy())


def _default_windows_per_shard(sources: list[LogitDataset]) -> int:
    sizes = [s.windows for ds in sources for s in ds.shards]
    return int(np.median(sizes)) if sizes else 16


def _progress(total: int, desc: str, show: bool):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="window", dynamic_ncols=True)


def _run(operation: str, out: str, sources: list[LogitDataset],
         picks: Iterable[tuple[int, int]], total: int, params: dict[str, Any], *,
         header: DatasetHeader | None = None, windows_per_shard: int | None = None,
         transform: Callable[[WindowRecord], WindowRecord] | None = None,
         progress: bool = False) -> OperationResult:
    """Write (source index, window index) picks, in order, as a new dataset in `out`.

    Without `header`/`transform`, the output keeps the first source's codec and table: windows
    of sources coded alike are copied as blobs, the others decoded and encoded with that codec.
    With them (reencode), every window is decoded, transformed and encoded under `header`."""
    first = sources[0]
    wps = windows_per_shard or _default_windows_per_shard(sources)
    if wps <= 0:
        raise OperationError(f"--windows-per-shard must be positive, got {wps}")
    reencode = header is not None
    copyable = [not reencode and same_coding(first, ds) for ds in sources]
    targets = ("copied" if all(copyable) else
               "re-encoded" if not any(copyable) else "mixed")
    base = header or first.header
    # Descriptions every source shares (the corpus of a one-source operation) carry over.
    extra = {key: copy.deepcopy(value) for key, value in base.extra.items()
             if key != "lineage" and all(ds.header.extra.get(key) == value for ds in sources)}
    extra["lineage"] = lineage_step(operation, sources, params, targets)
    out_header = replace(base, packing=dict(base.packing, windows_per_shard=wps), extra=extra)
    codec = None if reencode else first.codec
    writer = DatasetWriter(out, out_header, codec, windows_per_shard=wps)
    bar = _progress(total, f"kdcache {operation}", progress)
    written = 0
    for d, i in picks:
        ds = sources[d]
        s, j = ds.locate(i)
        reader = ds.shard(s)
        fields = reader.fields(j)
        where = f"{reader.path}: window {j}"
        if copyable[d]:
            writer.add_encoded(_record(fields, written), int(fields["valid"].sum()),
                               bytes(fields["targets"]))
        else:
            rec = _decoded_record(ds, fields, written, where)
            writer.add(transform(rec) if transform else rec)
        written += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if written == 0:
        raise OperationError(f"{operation}: the selection holds no windows; nothing written")
    stats = {"operation": operation, "windows": written}
    manifest = writer.close(stats=stats)
    report = verify_dataset(out)
    if not report.ok:
        raise FormatError(f"{out}: the {operation} output failed verification:\n  "
                          + "\n  ".join(report.problems[:10]))
    return OperationResult(out=os.fspath(out), operation=operation, windows=written,
                           tokens=int(manifest["totals"]["tokens"]),
                           shards=int(manifest["totals"]["shards"]), targets=targets,
                           verified=True, lineage=manifest["extra"]["lineage"], stats=stats)


# ------------------------------------------------------------------------- operations

def subset(src: str, out: str, *, windows: str | None = None, documents: str | None = None,
           windows_per_shard: int | None = None, progress: bool = False) -> OperationResult:
    """Keep whole windows: those in `windows` ("0:100,200:300", manifest order) and/or those
    holding any document in `documents` (document ids, same syntax). A document's targets depend
    on the window it was packed in (causal packing attends across documents), so windows are
    never cut."""
    if not windows and not documents:
        raise OperationError("subset: give --windows and/or --documents")
    ds = open_dataset(src)
    _check_out(out, [ds])
    picked: set[int] = set()
    if windows:
        picked.update(parse_ranges(windows, what="--windows", limit=len(ds)))
    if documents:
        wanted = set(parse_ranges(documents, what="--documents"))
        found = windows_with_documents(ds, wanted)
        if not found:
            raise OperationError(f"{src}: no window holds any of the documents {documents}")
        picked.update(found)
    order = sorted(picked)
    params = {"windows": windows, "documents": documents, "source_windows": _spans(order)}
    return _run("subset", out, [ds], ((0, i) for i in order), len(order), params,
                windows_per_shard=windows_per_shard, progress=progress)


def _spans(indices: list[int]) -> str:
    """[0,1,2,5,6] -> "0:3,5:7": the selection, compactly, for the lineage."""
    spans, start, prev = [], None, None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            spans.append(f"{start}:{prev + 1}")
            start = prev = i
    if start is not None:
        spans.append(f"{start}:{prev + 1}")
    return ",".join(spans)


def merge(srcs: list[str], out: str, *, windows_per_shard: int | None = None,
          progress: bool = False) -> OperationResult:
    """Concatenate datasets of the same teacher, targets and packing (refused otherwise), in the
    order given. Window indices are renumbered 0..N-1; document ids are kept as they were."""
    if len(srcs) < 2:
        raise OperationError("merge: give at least two datasets")
    sources = [open_dataset(p) for p in srcs]
    check_mergeable(sources)
    _check_out(out, sources)
    picks = ((d, i) for d, ds in enumerate(sources) for i in range(len(ds)))
    return _run("merge", out, sources, picks, sum(len(ds) for ds in sources), {"order": srcs},
                windows_per_shard=windows_per_shard, progress=progress)


def reshard(src: str, out: str, *, windows_per_shard: int,
            progress: bool = False) -> OperationResult:
    """The same windows and targets (bit for bit) in shards of `windows_per_shard` windows."""
    ds = open_dataset(src)
    _check_out(out, [ds])
    return _run("reshard", out, [ds], ((0, i) for i in range(len(ds))), len(ds),
                {"windows_per_shard": windows_per_shard},
                windows_per_shard=windows_per_shard, progress=progress)


class _ChangeMeter:
    """How far re-encoded targets are from the source's: max |log-prob| change over the kept
    entries, and the mean KL(source || new) of the kept entries' renormalised distributions."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.kl_sum = 0.0
        self.rows = 0

    def add(self, ids_src, vals_src, ids_new, vals_new, kind: str) -> None:
        if kind != "topk" or vals_src.size == 0:
            return
        # A lossy codec may order ids of equal (quantised) log-prob differently: compare by id.
        # An id missing from the new row (a tie at the k boundary) takes the row's last value.
        order = np.argsort(ids_new, axis=1)
        ids_sorted = np.take_along_axis(ids_new, order, axis=1)
        vals_sorted = np.take_along_axis(vals_new, order, axis=1)
        pos = np.minimum(np.stack([np.searchsorted(r, q) for r, q in zip(ids_sorted, ids_src)]),
                         ids_new.shape[1] - 1)
        found = np.take_along_axis(ids_sorted, pos, axis=1) == ids_src
        vals_new = np.where(found, np.take_along_axis(vals_sorted, pos, axis=1),
                            vals_new[:, -1:])
        self.max_abs = max(self.max_abs, float(np.abs(vals_src - vals_new).max()))
        p = np.exp(vals_src.astype(np.float64))
        q = np.exp(vals_new.astype(np.float64))
        p /= p.sum(axis=1, keepdims=True)
        q /= q.sum(axis=1, keepdims=True)
        kl = (p * (np.log(p) - np.log(q))).sum(axis=1)
        self.kl_sum += float(kl.sum())
        self.rows += kl.shape[0]

    def as_dict(self) -> dict[str, Any]:
        return {"rows_compared": self.rows, "max_abs_logprob_change": self.max_abs,
                "mean_kl_renormalised": self.kl_sum / self.rows if self.rows else 0.0}


def reencode(src: str, out: str, *, codec: str | None = None, k: int | None = None,
             codec_params: dict[str, Any] | None = None, windows_per_shard: int | None = None,
             progress: bool = False) -> OperationResult:
    """Decode every window and encode it again with another codec and/or a smaller k (top-k
    targets keep their k largest entries, which are the first k: rows are stored descending).
    The codec's table is fitted afresh on the first window. Records in the lineage (and returns
    in `stats`) how far the new targets are from the old ones."""
    ds = open_dataset(src)
    _check_out(out, [ds])
    new_codec = codec or ds.header.codec
    if new_codec not in available_codecs():
        raise OperationError(f"--codec {new_codec!r} is unknown; available: "
                             f"{', '.join(available_codecs())}")
    new_k = ds.k if k is None else int(k)
    if not 0 < new_k <= ds.k:
        raise OperationError(f"--k {new_k}: must be between 1 and the source's k ({ds.k}); "
                             "targets cannot gain entries the teacher's dump did not keep")
    if new_k != ds.k and ds.kind != "topk":
        raise OperationError("--k applies to top-k targets only: sampled targets are draws, "
                             "not a ranking whose prefix could be kept")
    if new_codec == ds.header.codec and new_k == ds.k and not codec_params:
        raise OperationError("reencode: the output would equal the source; give --codec, "
                             "--k or codec parameters (use reshard to change the shard size)")
    params_in = dict(codec_params or {})
    same = new_codec == ds.header.codec
    header = replace(ds.header, codec=new_codec, k=new_k,
                     codec_params=dict(ds.header.codec_params, **params_in) if same else params_in)
    try:
        make_codec(header)  # parameters checked before anything is written
    except (TypeError, ValueError) as exc:
        raise OperationError(f"reencode: invalid codec settings for {new_codec}: {exc}") from None
    meter = _ChangeMeter()

    def cut(rec: WindowRecord) -> WindowRecord:
        if new_k == ds.k:
            return rec
        return replace(rec, ids=np.ascontiguousarray(rec.ids[:, :new_k]),
                       values=np.ascontiguousarray(rec.values[:, :new_k]))

    params = {"codec": new_codec, "k": new_k, "codec_params": params_in or None}
    result = _run("reencode", out, [ds], ((0, i) for i in range(len(ds))), len(ds), params,
                  header=header, windows_per_shard=windows_per_shard, transform=cut,
                  progress=progress)
    new = open_dataset(out)
    for i in range(len(ds)):
        a, b = ds[i], new[i]
        v = a.valid.numpy()
        src_vals = (a.logprobs if a.logprobs is not None else a.weights).numpy()[v, :new_k]
        new_vals = (b.logprobs if b.logprobs is not None else b.weights).numpy()[v]
        meter.add(a.ids.numpy()[v, :new_k], src_vals, b.ids.numpy()[v], new_vals, ds.kind)
    result.stats["change"] = meter.as_dict()
    return result

