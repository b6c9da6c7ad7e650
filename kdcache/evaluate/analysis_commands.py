"""`kdcache probe`, `kdcache diff`, `kdcache rope-plan` (argparse and light kdcache modules only at import time)."""

from __future__ import annotations

import argparse
import os

from kdcache.evaluate import rope_plan
from kdcache.evaluate.diff import diff_checkpoints
from kdcache.evaluate.models import EvalError, check_model_dir
from kdcache.evaluate.probe import PROBE_MODES, ProbeConfig, run_probe

# The handlers import what they run inside themselves: `kdcache --help` imports every commands
# module, and pyarrow, numba, torch, vLLM or Ray at module level would make it take seconds.
# The modules above import none of them at their top (torch is imported where a model runs).


def register(subparsers) -> None:
    _register_probe(subparsers)
    _register_diff(subparsers)
    _register_rope_plan(subparsers)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_probe_input(p) -> None:
    p.add_argument("--block", type=int, default=2048,
                   help="tokens per block, BOS and EOS included (default 2048)")
    p.add_argument("--repeats", type=int, default=64,
                   help="blocks in the window (default 64: 131,072 tokens)")
    p.add_argument("--text", help="UTF-8 text file for the block's content (default: built-in)")
    p.add_argument("--batch-blocks", type=int, default=4,
                   help="blocks per forward in document modes (default 4)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"{path}: cannot read probe text: {exc}") from None


# -- probe -------------------------------------------------------------------------------------
def _register_probe(subparsers) -> None:
    p = subparsers.add_parser(
        "probe", help="the paper's positional probe: repeated block, query drift, output KL",
        description=(
            "Repeat one block (BOS + n-2 content tokens + EOS) to fill a window, run the model "
            "in each packing mode and dtype, and record at the last token before every EOS the "
            "embeddings, pre-/post-RoPE query states of every layer, every layer's output and "
            "the output log-probs. Writes probe.json and PNGs (query element distance, query "
            "cosine, per-layer cosine, top-10 tokens, KL vs position) to --out, prints the mean "
            "KL(p_0 || p_r) table. document-global runs each block with position_ids offset "
            "(exact for a document mask, memory O(block)); causal runs one forward."))
    p.add_argument("model", help="Hugging Face causal LM directory")
    p.add_argument("--out", required=True, help="output directory")
    _add_probe_input(p)
    p.add_argument("--modes", type=_str_list, default=list(PROBE_MODES),
                   help=f"packing modes, comma-separated (default {','.join(PROBE_MODES)})")
    p.add_argument("--dtypes", type=_str_list, default=["float32", "bfloat16"],
                   help="dtypes, comma-separated: float32,bfloat16,float16 (default float32,bfloat16)")
    p.add_argument("--layer", type=int, default=0, help="layer for the query plots (default 0)")
    p.add_argument("--element", type=int, default=None,
                   help="flat query index for the single-element plot (default: head 0, the "
                        "RoPE pair that turns ~4 times over the window)")
    p.add_argument("--no-queries", action="store_true",
                   help="skip query capture (for architectures whose attention is not supported)")
    p.set_defaults(handler=_run_probe)


def _run_probe(args) -> int:
    from kdcache.evaluate import plots
    from kdcache.evaluate.report import one_line, table, write_json

    check_model_dir(args.model)
    cfg = ProbeConfig(block_tokens=args.block, repeats=args.repeats, modes=tuple(args.modes),
                      dtypes=tuple(args.dtypes), batch_blocks=args.batch_blocks,
                      query_layer=args.layer, element=args.element,
                      capture_queries=not args.no_queries, device=args.device)
    summary, data = run_probe(args.model, cfg, text=_read_text(args.text),
                              show_progress=not args.json)
    runs = data["runs"]
    first = runs[0]
    os.makedirs(args.out, exist_ok=True)
    pngs = []
    if summary["primary"]["query_element"]:
        if str(args.layer) not in first.query_pre_cosine:
            raise EvalError(f"layer {args.layer} has no query record")
        pngs.append(plots.plot_query_element(summary, first,
                                             os.path.join(args.out, "probe_query_element.png")))
        pngs.append(plots.plot_query_cosine(summary, first, args.layer,
                                            os.path.join(args.out, "probe_query_cosine.png")))
    pngs.append(plots.plot_layer_cosine(first, os.path.join(args.out, "probe_layer_cosine.png")))
    pngs.append(plots.plot_top_tokens(summary, first, os.path.join(args.out, "probe_top10.png")))
    pngs.append(plots.plot_kl(summary, runs, os.path.join(args.out, "probe_kl.png")))
    summary["plots"] = [os.path.basename(p) for p in pngs]
    write_json(os.path.join(args.out, "probe.json"), summary)
    if args.json:
        print(one_line(summary))
        return 0
    rows = []
    for run in runs:
        later = run.kl_mean[1:]
        rows.append([run.mode, run.dtype, later[0], sum(later) / len(later), max(run.kl_max),
                     max(run.kl_last[1:]), min(run.layer_cosine["final"])])
    print(table(["mode", "dtype", "KL r=1", "KL mean r>0", "KL max row", "KL last-tok max",
                 "min cos final"], rows))
    if summary["dtypes_skipped"]:
        print(f"skipped (not supported on this machine): {', '.join(summary['dtypes_skipped'])}")
    print(f"wrote {args.out}/probe.json and {len(pngs)} plots")
    return 0


# -- diff --------------------------------------------------------------------------------------
def _register_diff(subparsers) -> None:
    p = subparsers.add_parser(
        "diff", help="where two checkpoints' query states differ (per dimension, per position)",
        description=(
            "Run two checkpoints (HF model directories of one architecture, e.g. stage 1 and "
            "stage 2) on the probe input (repeated block, document mask, global positions) and "
            "report the Euclidean distance between their query states, before and after RoPE, "
            "per query dimension (coloured by RoPE pair: low index = high frequency) and per "
            "position, for chosen layers. Writes diff.json and PNGs to --out."))
    p.add_argument("model_a", help="first HF model directory (e.g. stage 1)")
    p.add_argument("model_b", help="second HF model directory (e.g. stage 2)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", type=_int_list, default=None,
                   help="layers, comma-separated; negative counts from the end (default 0,-1)")
    _add_probe_input(p)
    p.set_defaults(handler=_run_diff)


def _run_diff(args) -> int:
    from tqdm.auto import tqdm

    from kdcache.evaluate import plots
    from kdcache.evaluate.report import one_line, table, write_json

    cfg = ProbeConfig(block_tokens=args.block, repeats=args.repeats, modes=("document-global",),
                      dtypes=("float32",), batch_blocks=args.batch_blocks, device=args.device)
    with tqdm(total=2 * args.repeats, unit="block", desc="diff", disable=args.json) as bar:
        result = diff_checkpoints(args.model_a, args.model_b, cfg, layers=args.layers,
                                  text=_read_text(args.text), progress=bar.update)
    os.makedirs(args.out, exist_ok=True)
    pngs = [plots.plot_diff_dims(result, layer, os.path.join(args.out, f"diff_dims_layer{layer}.png"))
            for layer in result["layers"]]
    pngs.append(plots.plot_diff_positions(result, os.path.join(args.out, "diff_positions.png")))
    result["plots"] = [os.path.basename(p) for p in pngs]
    write_json(os.path.join(args.out, "diff.json"), result)
    if args.json:
        print(one_line(result))
        return 0
    rows = []
    for layer, entry in result["layers"].items():
        for stage in ("pre", "post"):
            top = entry[f"{stage}_top_dims"][:3]
            by_pos = entry[f"{stage}_by_position"]
            rows.append([layer, stage, ", ".join(f"{t['dim']} (pair {t['pair']})" for t in top),
                         min(by_pos), max(by_pos)])
    print(table(["layer", "RoPE", "largest dims", "min dist/pos", "max dist/pos"], rows))
    print(f"wrote {args.out}/diff.json and {len(pngs)} plots")
    return 0


# -- rope-plan ---------------------------------------------------------------------------------
def _register_rope_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "rope-plan", help="lowest RoPE theta for a context (Men et al.), critical dimension (Liu et al.)",
        description=(
            "For each stage (CONTEXT:THETA) or one --context: the lowest theta satisfying Men et "
            "al. 2024's bound sum_i cos(m*theta^(-2i/d)) >= 0 for all m <= context (first valid "
            "base on a grid of 100 points per decade, ascending), Liu et al. 2024's critical "
            "dimension 2*ceil((d/2)*log_theta(T/2pi)) for the training length, and the "
            "wavelength of every dimension pair. Flags a theta below the bound."))
    p.add_argument("--head-dim", type=int, required=True, help="attention head dimension")
    p.add_argument("--context", type=int, help="context length to plan for")
    p.add_argument("--theta", type=float, help="theta to check against the bound")
    p.add_argument("--stages", help="CONTEXT:THETA,... e.g. 2048:10000,131072:500000")
    p.add_argument("--robust", action="store_true",
                   help="also report the base from which the bound holds on the whole grid up to "
                        "10x the lowest (slower)")
    p.add_argument("--wavelengths", action="store_true", help="print the per-pair wavelength table")
    p.add_argument("--out", help="also write rope_plan.json and rope_plan.png to this directory")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(handler=_run_rope_plan)


def _run_rope_plan(args) -> int:
    from kdcache.evaluate.report import one_line, table, write_json

    if args.head_dim <= 0 or args.head_dim % 2:
        raise EvalError(f"--head-dim must be a positive even number, got {args.head_dim}")
    if args.stages:
        try:
            stages = rope_plan.parse_stages(args.stages)
        except ValueError as exc:
            raise EvalError(f"--stages: {exc}") from None
    elif args.context:
        stages = [(args.context, args.theta)]
    else:
        raise EvalError("give --context (and optionally --theta) or --stages")
    if any(length < 1 or (theta is not None and theta <= 1) for length, theta in stages):
        raise EvalError("contexts must be >= 1 and thetas > 1")
    result = rope_plan.plan(args.head_dim, stages, context=args.context, robust=args.robust)
    if args.out:
        from kdcache.evaluate.plots import plot_rope_plan

        os.makedirs(args.out, exist_ok=True)
        plot_rope_plan(result, os.path.join(args.out, "rope_plan.png"))
        result["plots"] = ["rope_plan.png"]
        write_json(os.path.join(args.out, "rope_plan.json"), result)
    if args.json:
        print(one_line(result))
        return 0
    rows = []
    for s in result["stages"]:
        rows.append([s["context"], s["theta"] if s["theta"] is not None else "-",
                     s["theta_lower_bound"],
                     "BELOW BOUND" if s["below_bound"] else ("ok" if s["theta"] else "-"),
                     s["critical_dimension"] if s["critical_dimension"] is not None else "-",
                     s["extrapolation_limit"] if s["extrapolation_limit"] else "-"]
                    + ([s["theta_valid_from"]] if args.robust else []))
    print(f"head dim {args.head_dim}; criterion: {result['criterion']}")
    print(table(["context", "theta", "lowest theta (Men)", "check", "d_extra (Liu)",
                 "extrapolation limit"] + (["valid from"] if args.robust else []), rows))
    if args.wavelengths:
        for s in result["stages"]:
            if not s["wavelengths"]:
                continue
            print(f"\nstage context {s['context']}, theta {s['theta']:g}: pairs (i, i + d/2)")
            print(table(["pair", "frequency", "wavelength", "turns in context", "full period"],
                        [[w["pair"], w["frequency"], w["wavelength"], w["turns_in_context"],
                          "yes" if w["full_period_seen"] else "no"] for w in s["wavelengths"]]))
    for context in result["flagged"]:
        print(f"warning: theta for context {context} is below Men et al.'s lower bound")
    return 0
