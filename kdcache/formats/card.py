"""The dataset card: a README.md generated into every dataset, for whoever receives a copy."""

from __future__ import annotations

from typing import Any

from kdcache.formats.packing import MODES

def render_card(manifest: dict[str, Any]) -> str:
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
    lines = [
        f"# kdcache logit dataset: {teacher.get('name', 'unnamed teacher')}",
        "",
        "Offline knowledge-distillation targets written by kdcache "
        f"({manifest.get('created_by', '?')}, {manifest.get('created_at', '?')}), "
        f"format `{manifest['format']}` version {manifest['format_version']}.",
        "",
        "## What it holds",
        f"- {totals['windows']:,} packed windows, {totals['tokens']:,} tokens, "
        f"{totals['shards']} shards, {totals['bytes']:,} bytes.",
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
        f"- Packing settings: `{ {k: v for k, v in p.items() if k != 'mode'} }`.",
    ]
    if stats:
        lines.append(f"- Corpus and run statistics: `{stats}`.")
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
        "format is specified in kdcache's FORMAT.md; nothing in it needs pickle to load.",
        "",
    ]
    return "\n".join(lines)


def _mode_text(mode: str) -> str:
    return MODES[mode].card_text if mode in MODES else ""
