"""`kdcache eval needle` and `kdcache eval lm` (argparse only at import time)."""

from __future__ import annotations

import argparse
import os

# The handlers import what they run inside themselves: `kdcache --help` imports every commands
# module, and pyarrow, numba, torch, vLLM or Ray at module level would make it take seconds.


def _ints(text: str) -> list[int]:
    try:
        return [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _depths(text: str) -> list[float]:
    """'0,0.25,0.5' or a count: '11' -> 11 evenly spaced depths from 0 to 1."""
    try:
        if "," not in text and "." not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return [i / (count - 1) for i in range(count)] if count > 1 else [0.5]
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or comma-separated fractions, got {text!r}")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate HF causal LMs: needle retrieval by distance, perplexity/KL",
        description="Evaluate one or more Hugging Face causal LM directories. See the "
                    "subcommands `needle` and `lm`.")
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    _register_needle(sub)
    _register_lm(sub)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])


def _register_needle(sub) -> None:
    p = sub.add_parser(
        "needle", help="passkey / RULER-style needle retrieval by length, depth and distance",
        description=(
            "Build passkey (landmark-attention format) or RULER-style NIAH prompts (single, "
            "multikey, multivalue, multiquery; values numbers, words or uuids) with each model's "
            "own tokenizer to exact token lengths and needle depths, decode greedily (vLLM when "
            "installed, transformers otherwise), score by exact match (passkey) or "
            "string_match_all (NIAH), and report accuracy by context length x depth (heat map) "
            "and by needle distance, the tokens between needle and question (one curve per "
            "model on shared axes). Writes needle.json and PNGs to --out."))
    p.add_argument("models", nargs="+", help="Hugging Face causal LM directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--task", type=lambda s: [x for x in s.split(",") if x], default=["passkey"],
                   help="passkey, niah_single, niah_multikey, niah_multivalue, niah_multiquery "
                        "(comma-separated; default passkey)")
    p.add_argument("--values", default="numbers", help="NIAH values: numbers, words or uuids")
    p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096],
                   help="prompt lengths in tokens (default 1024,2048,4096)")
    p.add_argument("--depths", type=_depths, default=_depths("11"),
                   help="needle depths: a count (evenly spaced 0..1) or fractions (default 11)")
    p.add_argument("--samples", type=int, default=4, help="prompts per length x depth (default 4)")
    p.add_argument("--haystack", help="your documents as haystack: .txt, .jsonl (\"text\") or a "
                                      "folder of .txt (default: the noise sentences)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy tokens to generate (default: 16 passkey, 32 single/multikey, "
                        "128 multivalue/multiquery)")
    p.add_argument("--engine", default="auto", help="auto (vLLM if installed), vllm or hf")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="torch device for the hf engine")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per hf generate call")
    p.add_argument("--seed", type=int, default=0, help="seed for keys, values and placements")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.set_defaults(handler=_run_needle)


def _run_needle(args) -> int:
    from kdcache.evaluate.needle import (NeedleConfig, bin_label, plot_needle,
                                         run_needle)
    from kdcache.evaluate.report import one_line, table, write_json

    cfg = NeedleConfig(tasks=tuple(args.task), value_type=args.values,
                       lengths=tuple(args.lengths), depths=tuple(args.depths),
                       samples=args.samples, max_new_tokens=args.max_new_tokens,
                       engine=args.engine, dtype=args.dtype, device=args.device,
                       batch_size=args.batch_size, seed=args.seed)
    result = run_needle(args.models, cfg, haystack=args.haystack, show_progress=not args.json)
    os.makedirs(args.out, exist_ok=True)
    pngs = [p for task in cfg.tasks for p in plot_needle(result, task, args.out)]
    result["plots"] = [os.path.basename(p) for p in pngs]
    write_json(os.path.join(args.out, "needle.json"), result)
    if args.json:
        print(one_line(result))
        return 0
    for task in cfg.tasks:
        labels = sorted({b["bin"] for m in result["models"]
                         for b in m["tasks"][task]["by_distance"]})
        rows = []
        for m in result["models"]:
            data = m["tasks"][task]
            acc = {b["bin"]: b["accuracy"] for b in data["by_distance"]}
            rows.append([m["name"], data["accuracy"]] + [data["by_length"][str(L)] for L in cfg.lengths]
                        + [acc.get(k, float("nan")) for k in labels])
        print(f"{task} ({result['config']['engine']}): accuracy overall, by length, by distance")
        print(table(["model", "all"] + [f"L={L}" for L in cfg.lengths]
                    + [f"d {bin_label(k)}" for k in labels], rows))
    print(f"wrote {args.out}/needle.json and {len(pngs)} plots")
    return 0


def _register_lm(sub) -> None:
    p = sub.add_parser(
        "lm", help="held-out perplexity and KL to the teacher's stored targets",
        description=(
            "Run each model over the windows of a kdcache logit dataset with the dataset's "
            "packing mode and report perplexity of the true next tokens and the mean KL from "
            "the teacher's stored top-k distribution (tail merged into one outcome) to the "
            "model, overall and per position bucket. Writes lm.json and lm_position.png."))
    p.add_argument("models", nargs="+", help="Hugging Face causal LM directories")
    p.add_argument("--data", required=True, help="kdcache logit dataset (path or fsspec URL)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate the first N windows")
    p.add_argument("--last-windows", type=int, default=None, metavar="N",
                   help="evaluate the last N windows (held out by `kdcache train --holdout-windows N`)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.set_defaults(handler=_run_lm)


def _run_lm(args) -> int:
    from tqdm.auto import tqdm

    from kdcache.evaluate.lm import evaluate_lm, plot_lm
    from kdcache.evaluate.report import one_line, table, write_json

    with tqdm(unit="window", desc="eval lm", disable=args.json) as bar:
        result = evaluate_lm(args.models, args.data, max_windows=args.max_windows,
                             dtype=args.dtype, device=args.device, progress=bar.update,
                             last_windows=args.last_windows)
    os.makedirs(args.out, exist_ok=True)
    plot = plot_lm(result, os.path.join(args.out, "lm_position.png"))
    result["plots"] = [os.path.basename(plot)]
    write_json(os.path.join(args.out, "lm.json"), result)
    if args.json:
        print(one_line(result))
        return 0
    print(table(["model", "windows", "rows", "perplexity", "KL to teacher"],
                [[m["name"], result["windows"], m["rows"], m["perplexity"], m["kl_to_teacher"]]
                 for m in result["models"]]))
    print(f"wrote {args.out}/lm.json and {plot}")
    return 0
