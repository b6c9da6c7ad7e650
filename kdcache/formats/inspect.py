"""`inspect`: what a dataset holds, on one screen (or one JSON line)."""

from __future__ import annotations

import math
import os
from typing import Any

from kdcache.errors import KdcacheError
from kdcache.formats.reader import LogitDataset


def summarize(ds: LogitDataset) -> dict[str, Any]:
    m = ds.manifest
    totals = m["totals"]
    tokens = totals["tokens"]
    return {
        "path": ds.root,
        "format_version": m["format_version"],
        "teacher": m.get("teacher", {}).get("name") or m.get("teacher", {}).get("path"),
        "kind": ds.kind,
        "k": ds.k,
        "vocab_size": ds.vocab_size,
        "temperature": m["targets"].get("temperature", 1.0),
        "mode": ds.packing.get("mode"),
        "window": ds.packing.get("window"),
        "shards": totals["shards"],
        "windows": totals["windows"],
        "tokens": tokens,
        "valid_rows": totals["valid_rows"],
        "bytes": totals["bytes"],
        "bytes_per_token": totals["bytes"] / tokens if tokens else 0.0,
        "target_bytes_per_token": totals["target_bytes_per_token"],
        "target_bytes_per_entry": totals["target_bytes_per_token"] / ds.k,
        "codec": m["codec"]["name"],
        "created_at": m.get("created_at"),
        "created_by": m.get("created_by"),
        "stats": m.get("stats", {}),
    }


def window_preview(ds: LogitDataset, index: int, rows: int = 4, top: int = 5) -> dict[str, Any]:
    """The first `rows` valid rows of window `index`: input token, then the top targets."""
    if not 0 <= index < len(ds):
        raise KdcacheError(f"{ds.root}: --window {index} is out of range: the dataset holds "
                           f"windows 0..{len(ds) - 1}")
    w = ds[index]
    values = w.logprobs if w.logprobs is not None else w.weights
    valid_rows = w.valid.nonzero().flatten()[:rows].tolist()
    preview = []
    for r in valid_rows:
        ids = w.ids[r, :top].tolist()
        vals = values[r, :top].tolist()
        probs = [math.exp(v) for v in vals] if w.logprobs is not None else vals
        preview.append({"row": r, "token": int(w.tokens[r]),
                        "next_token": int(w.tokens[r + 1]) if r + 1 < w.n_tokens else None,
                        "top_ids": ids, "top_probs": [round(p, 4) for p in probs]})
    return {"window": index, "window_index": w.window_index, "tokens": w.n_tokens,
            "documents": int(w.doc_offsets.numel() - 1), "valid_rows": int(w.valid.sum()),
            "rows": preview}


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"dataset      {os.fspath(s['path'])}",
        f"teacher      {s['teacher']}",
        f"targets      {s['kind']}, k={s['k']}, vocab {s['vocab_size']:,}, T={s['temperature']}",
        f"packing      {s['mode']}, window {s['window']}",
        f"size         {s['windows']:,} windows, {s['tokens']:,} tokens, {s['shards']} shards, "
        f"{s['bytes'] / 1e6:.2f} MB",
        f"bytes/token  {s['bytes_per_token']:.1f} total, {s['target_bytes_per_token']:.1f} for "
        f"targets ({s['target_bytes_per_entry']:.2f} per entry, codec {s['codec']})",
        f"created      {s['created_at']} by {s['created_by']}",
    ]
    return "\n".join(lines)
