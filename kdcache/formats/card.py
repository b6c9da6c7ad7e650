"""The dataset card: a README.md generated into every dataset, for whoever receives a copy.

It follows the Hugging Face Hub's dataset-card convention: a YAML metadata block between `---`
lines (license, tags, size category, then kdcache's own keys: teacher, tokenizer, kind, k,
packing, tokens, bytes, ...), then prose, with a figure of the targets (card_figure.py) at
`card/targets.png`. Every value is written as YAML or JSON or formatted text, never as a Python
repr, so the card reads the same to people and to the Hub's parser. kdcache never reads it back.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import yaml

from kdcache.formats import card_figure, storage
from kdcache.formats.manifest import CARD_NAME
from kdcache.formats.packing import MODES

log = logging.getLogger("kdcache.formats")

FIGURE_PATH = "card/targets.png"

# The Hub's size categories, by number of examples (here: windows).
_SIZE_CATEGORIES = [(10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"),
                    (10**6, "100K<n<1M"), (10**7, "1M<n<10M"), (10**8, "10M<n<100M"),
                    (10**9, "100M<n<1B")]


def _size_category(n: int) -> str:
    return next((label for limit, label in _SIZE_CATEGORIES if n < limit), "n>1B")


def _plain(value: Any) -> Any:
    """JSON-compatible plain data (YAML and JSON then write it without Python reprs)."""
    return json.loads(json.dumps(value, default=str))


def card_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    """The YAML block: the Hub's own keys first, then what a KD user filters datasets by."""
    t, p, totals = manifest["targets"], manifest["packing"], manifest["totals"]
    teacher = manifest.get("teacher", {})
    extra = manifest.get("extra", {})
    return _plain({
        "license": extra.get("license") or teacher.get("license") or "unknown",
        "pretty_name": f"kdcache logits of {teacher.get('name', 'an unnamed teacher')}",
        "tags": ["knowledge-distillation", "logits", "kdcache", t["kind"]],
        "size_categories": [_size_category(int(totals["windows"]))],
        "teacher": {key: teacher.get(key) for key in
                    ("name", "architecture", "vocab_size", "config_hash", "weights_hash",
                     "engine", "dtype") if key in teacher},
        "tokenizer": {"source": teacher.get("path", teacher.get("name")),
                      "hash": teacher.get("tokenizer_hash")},
        "kind": t["kind"],
        "k": t["k"],
        "vocab_size": t["vocab_size"],
        "temperature": t.get("temperature", 1.0),
        "codec": manifest["codec"]["name"],
        "packing": {"mode": p["mode"], "window": p.get("window")},
        "windows": totals["windows"],
        "tokens": totals["tokens"],
        "valid_rows": totals["valid_rows"],
        "shards": totals["shards"],
        "bytes": totals["bytes"],
        "target_bytes_per_token": round(float(totals["target_bytes_per_token"]), 3),
        "format": manifest["format"],
        "format_version": manifest["format_version"],
        "created_by": manifest.get("created_by"),
        "created_at": manifest.get("created_at"),
    })


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        return [item for key, sub in value.items()
                for item in _flatten(sub, f"{prefix}.{key}" if prefix else str(key))]
    return [(prefix, value)]


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(_plain(value))
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _table(items: dict[str, Any]) -> list[str]:
    rows = _flatten(_plain(items))
    return ["| setting | value |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows]


def render_card(manifest: dict[str, Any], figure: dict[str, Any] | None = None) -> str:
    """README.md text. `figure`: {"path", "rows", "windows"} of the stored figure, or
    {"missing": reason}."""
    t = manifest["targets"]
    p = manifest["packing"]
    totals = manifest["totals"]
    teacher = manifest.get("teacher", {})
    codec = manifest["codec"]
    stats = manifest.get("stats", {})
    kind_text = (f"the teacher's top-{t['k']} next-token ids with their full-vocabulary "
                 f"log-probs (temperature {t['temperature']}), descending" if t["kind"] == "topk"
                 else f"up to {t['k']} sampled next-token ids per position with weights summing "
                      "to 1 (random-sampling KD)")
    front = yaml.safe_dump(card_metadata(manifest), sort_keys=False, allow_unicode=True,
                           default_flow_style=False)
    lines = [
        "---", front.rstrip("\n"), "---", "",
        f"# kdcache logit dataset: {teacher.get('name', 'unnamed teacher')}",
        "",
        "Offline knowledge-distillation targets written by kdcache "
        f"({manifest.get('created_by', '?')}, {manifest.get('created_at', '?')}), "
        f"format `{manifest['format']}` version {manifest['format_version']}.",
        "",
        "## What it holds",
        f"- {totals['windows']:,} packed windows, {totals['tokens']:,} tokens "
        f"({totals['valid_rows']:,} with a target), {totals['shards']} shards, "
        f"{totals['bytes']:,} bytes.",
        f"- Targets: {kind_text}; {totals['target_bytes_per_token']:.1f} bytes per token for the "
        f"targets (codec `{codec['name']}`).",
        f"- Vocabulary: {t['vocab_size']:,} ids. Row i of a window is the teacher's distribution "
        "for token i+1 given tokens up to i; rows flagged invalid carry no target.",
        "",
        "## How it was made",
        f"- Teacher: `{teacher.get('path', teacher.get('name', '?'))}` "
        f"(config hash `{teacher.get('config_hash', '?')}`, tokenizer hash "
        f"`{teacher.get('tokenizer_hash', '?')}`).",
        f"- Packing: `{p['mode']}` mode, {p.get('window', '?')}-token windows: "
        f"{_mode_text(p['mode'])}. Train students with the matching mask and positions.",
        "",
        "Packing settings:",
        "",
        *_table({k: v for k, v in p.items() if k != "mode"}),
        "",
        "Codec settings:",
        "",
        *_table({"name": codec["name"], **codec.get("params", {})}),
    ]
    if stats:
        lines += ["", "Corpus and run statistics:", "", *_table(stats)]
    lineage = manifest.get("extra", {}).get("lineage") or []
    if lineage:
        lines += ["", "## Lineage", "",
                  "Made from other kdcache datasets, oldest step first (each source is named "
                  "with the xxh3-64 of its manifest.json, which pins its exact content):", ""]
        lines += [_lineage_line(step) for step in lineage]
    lines += ["", "## The targets", ""]
    if figure and "path" in figure:
        lines += [
            f"![Teacher entropy and top-1 probability, overall and by position]({figure['path']})",
            "",
            f"{figure['rows']:,} rows from {figure['windows']} windows spread over the dataset. "
            + ("Entropy is over the stored top-k ids, a lower bound on the teacher's entropy. "
               if t["kind"] == "topk" else "Entropy is that of the sampled weights. ")
            + "Position counts the tokens the teacher attended to (in the document for "
              "document-masked modes). Bottom row: each position bin's rows as a histogram "
              "(columns sum to 1), with the median and quartiles.",
        ]
    else:
        lines.append(f"No figure: {(figure or {}).get('missing', 'not drawn')}.")
    lines += [
        "",
        "## How to load it",
        "```python",
        "from kdcache.formats.reader import open_dataset",
        "ds = open_dataset('PATH_OR_URL')      # checks manifest, sizes and hashes as it reads",
        "w = ds[0]                             # tokens, doc_offsets, valid, ids [n,k], "
        + ("logprobs" if t["kind"] == "topk" else "weights") + " [n,k]",
        "```",
        "Check a copy with `kdcache verify PATH`, summarise it with `kdcache inspect PATH`. The "
        "format is specified byte for byte in kdcache's FORMAT.md, so it can be read without "
        "kdcache; nothing in it needs pickle to load.",
        "",
    ]
    return "\n".join(lines)


def _lineage_line(step: dict[str, Any]) -> str:
    sources = "; ".join(
        f"`{src.get('path')}` (manifest xxh3 `{src.get('manifest_xxh3')}`, "
        f"{src.get('windows', 0):,} windows, codec `{src.get('codec')}`, k={src.get('k')})"
        for src in step.get("sources", []))
    params = {k: v for k, v in (step.get("params") or {}).items() if v is not None}
    return (f"- `{step.get('operation')}` of {sources}; parameters {_cell(params)}; targets "
            f"{step.get('targets')} ({step.get('by')}, {step.get('at')}).")


def write_card(root: str, manifest: dict[str, Any]) -> None:
    """Draw the figure from a sample of the written shards, then write README.md (both atomic).
    The card is informative: a figure that cannot be drawn is reported, never fatal."""
    fs, base = storage.resolve(root)
    figure: dict[str, Any]
    try:
        sample = card_figure.sample_targets(root, manifest)
        if sample.rows == 0:
            figure = {"missing": "the sampled windows hold no valid rows"}
        else:
            name = manifest.get("teacher", {}).get("name", "teacher")
            title = f"{name}: {manifest['targets']['kind']} targets, k={manifest['targets']['k']}"
            png = card_figure.render_figure(sample, title)
            storage.atomic_write_bytes(fs, storage.join(base, FIGURE_PATH), png)
            figure = {"path": FIGURE_PATH, "rows": sample.rows, "windows": sample.windows}
    except Exception as exc:  # informative only: a plotting failure must not lose a dataset
        log.warning("%s: dataset card figure not drawn: %s: %s", root, type(exc).__name__, exc)
        figure = {"missing": f"drawing it failed ({type(exc).__name__})"}
    storage.atomic_write_bytes(fs, storage.join(base, CARD_NAME),
                               render_card(manifest, figure).encode())


def _mode_text(mode: str) -> str:
    return MODES[mode].card_text if mode in MODES else ""
