"""qrank top-k windows validated and encoded on worker processes (procs.py), same bytes.

The writer's side (`encode_window`): the window's structural checks, its valid rows gathered
into one shared memory file, then per row block, on worker i (qrank_topk's block steps, the
same arithmetic as on threads):

1. "prepare": the block's rows checked (validate.check_topk_rows) and prepared (qrank_topk.Rows),
   kept in the worker;
2. "kl" (rate control, a few candidate steps): the block's row KLs into the shared file; the
   writer sums them in row order and picks the step (qrank_topk.choose_sqrt_step);
3. "symbolize": codes, tops, ranks and symbols into the window's shared arrays;

then the column blocks and zstd on the writer's threads (numba and zstd release the GIL) and the
blob packed as on the thread path. Only descriptors, offsets and names cross the socket.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from kdcache.formats.codecs import qrank_topk as topk
from kdcache.formats.codecs.blocks import BlockPool, split
from kdcache.formats.codecs.procs import (ProcessPool, SharedArrays, memfd_of, read_fd,
                                          replies)
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.validate import check_topk_rows, failing_with, window_rows, window_tag
from kdcache.formats.window import WindowRecord

if TYPE_CHECKING:
    from kdcache.formats.codecs.qrank import QRankCodec

# Windows smaller than two row blocks stay on threads (one block gains nothing from a process).
MIN_ENTRIES = 2 * topk.MIN_BLOCK
_GATHER_ROWS = 4096  # rows gathered at once into the shared file (bounds the temporary)
_keys = itertools.count()


def encodes_in_processes(codec, header: DatasetHeader, rec: WindowRecord) -> bool:
    """Whether this window goes to worker processes (qrank top-k, two blocks or more)."""
    return (codec.name == "qrank" and header.kind == "topk" and codec.kind == "topk"
            and np.shape(rec.ids)[0] * header.k >= MIN_ENTRIES)


def encode_window(codec: "QRankCodec", rec: WindowRecord, header: DatasetHeader, where: str,
                  procs: ProcessPool, threads: BlockPool) -> tuple[int, bytes]:
    """(valid rows, blob) of one window: validated and encoded as validate_window + encode
    would, the row blocks on `procs`. Raises TargetValidationError for bad targets."""
    rows, _ = window_rows(rec, header, where=where)
    m, k = rows.size, header.k
    blocks = topk.row_blocks(m, k, procs.workers)
    layout = {"ids": ("<i8", (m, k)), "values": ("<f4", (m, k)), "rows": ("<i8", (m,)),
              **topk.window_layout(m, k, len(blocks))}
    key = f"{os.getpid()}-{next(_keys)}"
    table_fd = _table_fd(codec)
    used: list[int] = []
    with SharedArrays.create(layout) as shm:
        try:
            _gather(shm["ids"], np.asarray(rec.ids), rows, threads)
            _gather(shm["values"], np.asarray(rec.values), rows, threads)
            shm["rows"][:] = rows
            base = {"key": key, "m": m, "k": k}
            prepare = {**base, "op": "prepare", "spec": shm.spec, "codec": _codec_spec(codec),
                       "tag": window_tag(rec, where), "vocab": header.vocab_size,
                       "rate_control": topk.rate_controlled(codec, m, k)}
            futures = []
            for i, (a, b) in enumerate(blocks):
                used.append(i)
                futures.append(procs.submit(i, {**prepare, "block": i, "a": a, "b": b},
                                            [shm.fd, table_fd]))
            replies(futures)

            def kl(units: int) -> float:
                replies([procs.submit(i, {**base, "op": "kl", "units": units}) for i in used])
                return float(topk.mean_in_order(shm["row_kls"]))

            units = topk.choose_sqrt_step(codec, m, k, kl)
            replies([procs.submit(i, {**base, "op": "symbolize", "units": units}) for i in used])
            used = []  # symbolize released the blocks
            total_bits, streams, bits = topk.assemble_streams(shm.arrays, m, k, threads)
        finally:
            for i in used:  # an error: workers forget the window (replies not awaited)
                procs.submit(i, {"op": "drop", "key": key})
    return m, codec._pack(m, 0, total_bits, streams, bits, param=units, pool=threads)


def _gather(dst: np.ndarray, src: np.ndarray, rows: np.ndarray, threads: BlockPool) -> None:
    """dst = src[rows] (cast to dst's dtype) in row blocks on `threads` (copies release the
    GIL), without a window-sized temporary."""
    contiguous = rows.size and rows[-1] - rows[0] + 1 == rows.size  # one run: causal windows

    def block(ab: tuple[int, int]) -> None:
        for a in range(ab[0], ab[1], _GATHER_ROWS):
            b = min(a + _GATHER_ROWS, ab[1])
            if contiguous:
                np.copyto(dst[a:b], src[rows[a]:rows[a] + b - a], casting="unsafe")
            else:
                dst[a:b] = src[rows[a:b]]

    threads.map(block, split(rows.size, threads.workers))


def _codec_spec(codec: "QRankCodec") -> dict:
    return {"kind": codec.kind, "k": codec.k, "vocab_size": codec.vocab_size,
            "params": codec.config(), "key": _codec_key(codec)}


_tables: dict[str, int] = {}
_tables_lock = threading.Lock()


def _codec_key(codec: "QRankCodec") -> str:
    h = xxhash.xxh3_64(repr((codec.kind, codec.k, codec.vocab_size,
                             sorted(codec.config().items()))).encode())
    h.update(codec.table or b"")
    return h.hexdigest()


def _table_fd(codec: "QRankCodec") -> int:
    """A memory file holding the codec's table, one per table, kept for this process's life
    (a few: a dump uses one codec)."""
    key = _codec_key(codec)
    with _tables_lock:
        fd = _tables.get(key)
        if fd is None:
            if len(_tables) >= 4:
                os.close(_tables.pop(next(iter(_tables))))
            fd = _tables[key] = memfd_of(codec.table or b"")
        return fd


# ---------------------------------------------------------------------------- worker side


class _Block:
    def __init__(self, shm: SharedArrays, codec: "QRankCodec", rows: topk.Rows, index: int,
                 a: int, b: int) -> None:
        self.shm, self.codec, self.rows, self.index, self.a, self.b = shm, codec, rows, index, a, b


def _worker_codec(state: dict, spec: dict, table_fd: int) -> "QRankCodec":
    from kdcache.formats.codecs.qrank import QRankCodec

    codecs = state.setdefault("codecs", {})
    codec = codecs.get(spec["key"])
    if codec is None:
        table = read_fd(table_fd) or None
        codec = QRankCodec(kind=spec["kind"], k=spec["k"], vocab_size=spec["vocab_size"],
                           table=table, **spec["params"])
        if len(codecs) >= 4:
            codecs.pop(next(iter(codecs)))
        codecs[spec["key"]] = codec
    return codec


def _prepare(state: dict, req: dict, fds: list[int]) -> None:
    codec = _worker_codec(state, req["codec"], fds[1])
    shm = SharedArrays.attach(fds[0], req["spec"])
    try:
        a, b = req["a"], req["b"]
        ids, values = shm["ids"][a:b], shm["values"][a:b]
        check_topk_rows(ids, values, shm["rows"][a:b], req["vocab"], failing_with(req["tag"]))
        rows = topk.Rows(values, rate_control=req["rate_control"])
        rows.prepare(0, b - a)
    except BaseException:
        shm.close()
        raise
    state.setdefault("blocks", {})[req["key"]] = _Block(shm, codec, rows, req["block"], a, b)


def _kl(state: dict, req: dict, fds: list[int]) -> None:
    blk = state["blocks"][req["key"]]
    topk.block_kls(blk.codec, req["units"], blk.rows, 0, blk.b - blk.a,
                   blk.shm["row_kls"][blk.a:blk.b])


def _symbolize(state: dict, req: dict, fds: list[int]) -> None:
    blk = state["blocks"].pop(req["key"])
    try:
        shm = blk.shm
        topk.symbolize_block(blk.codec, req["units"], blk.rows, 0, blk.b - blk.a,
                             shm["ids"][blk.a:blk.b], shm.arrays, blk.a,
                             shm["counts"][blk.index])
    finally:
        blk.rows = None
        blk.shm.close()


def _drop(state: dict, req: dict, fds: list[int]) -> None:
    blk = state.get("blocks", {}).pop(req["key"], None)
    if blk is not None:
        blk.rows = None
        blk.shm.close()


WORKER_OPS = {"prepare": _prepare, "kl": _kl, "symbolize": _symbolize, "drop": _drop}
