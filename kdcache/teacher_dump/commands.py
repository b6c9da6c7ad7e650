"""CLI: `kdcache make-teacher`, `kdcache dump` and `kdcache bench dump`."""

from __future__ import annotations

import argparse
import json

from kdcache.errors import ConfigMismatchError
from kdcache.formats.packing import PACKING_MODES

# The handlers import what they run inside themselves: `kdcache --help` imports every commands
# module, and pyarrow, numba, torch, vLLM or Ray at module level would make it take seconds.


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-teacher", help="build a tiny local teacher model + tokenizer (no network)",
        description="Build a small Llama-style teacher (head_dim 64, float32) and a byte-level BPE "
                    "tokenizer trained on the built-in synthetic corpus, optionally train it for "
                    "--train-seconds so its predictions are peaked, and save it as a normal "
                    "Hugging Face model directory that transformers and vLLM both load. Used by "
                    "tests, benches and `make demo`.")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--preset", default="tiny", choices=["tiny", "demo", "bench", "gpu-1b"],
                   help="model size: tiny (tests), demo, bench (4 layers, 256 wide, 32k vocab), "
                        "gpu-1b (12 layers, 2048 wide, 202,048 vocab: GPU throughput)")
    p.add_argument("--train-seconds", type=float, default=0.0,
                   help="train on the built-in corpus for this long (default 0: random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(handler=_run_make_teacher)

    p = subparsers.add_parser(
        "dump", help="run a teacher over a corpus and store its top-k targets as shards",
        description="Read a corpus (JSONL with a text field or chat 'messages', Parquet, folders "
                    "of .txt; local or any fsspec URL; or 'builtin'/'builtin-chat'), tokenize with the teacher's tokenizer, wrap "
                    "documents BOS...EOS, pack them into windows, run the teacher on Ray actors "
                    "(vLLM, or the transformers reference engine) and write top-k full-vocabulary "
                    "log-probs as compressed Arrow shards with a manifest. plan.json is written "
                    "first; re-running the same command resumes (complete shards are skipped), and "
                    "a different configuration in the same --out is refused.")
    p.add_argument("--model", required=True, help="teacher: a Hugging Face model directory")
    p.add_argument("--corpus", required=True,
                   help="corpus file, folder, glob or fsspec URL, or 'builtin'")
    p.add_argument("--out", required=True, help="dataset directory or fsspec URL")
    p.add_argument("--k", type=int, default=64, help="top-k entries per token (default 64)")
    p.add_argument("--kind", default="topk", choices=["topk", "sampled"],
                   help="topk (default): top-k log-probs; sampled: RS-KD, --draws samples per "
                        "position from the full distribution at --temperature, stored as counts "
                        "(vLLM pooler path)")
    p.add_argument("--draws", type=int, default=None,
                   help="with --kind sampled: draws per position (e.g. 50)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="with --kind sampled: temperature of the draws (default 1.0)")
    p.add_argument("--window", type=int, default=131072, help="tokens per window")
    p.add_argument("--mode", default="document", choices=list(PACKING_MODES),
                   help="packing mode (document-global needs --engine hf)")
    p.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    p.add_argument("--workers", type=int, default=1,
                   help="engines (Ray actors), each on its own GPUs; spread over the cluster")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="GPUs per engine, tensor parallel (vLLM; one node per engine)")
    p.add_argument("--pipeline-parallel", type=int, default=1,
                   help="pipeline stages per engine (vLLM); an engine uses tensor x pipeline "
                        "GPUs of one node")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's share of each of its GPUs' memory (default: vLLM's, 0.9)")
    p.add_argument("--engines-per-gpu", type=int, default=1,
                   help="share each GPU between this many single-GPU engines (default 1: an "
                        "engine never shares its GPU); needs --gpu-memory-utilization <= 1/N")
    p.add_argument("--encode-workers", type=int, default=None,
                   help="processes per engine that validate and encode its shards while it "
                        "computes the next (default: the CPUs, up to 16; 1: in the writer's "
                        "thread); shard bytes do not depend on it")
    p.add_argument("--ray-address", default=None, help="join a Ray cluster (default: local)")
    p.add_argument("--no-ray", action="store_true",
                   help="one engine in this process, without Ray (one machine, --workers 1)")
    p.add_argument("--seed", type=int, default=0, help="packing seed")
    p.add_argument("--drop-long-docs", action="store_true",
                   help="drop documents longer than the window instead of splitting them")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet text field (default text)")
    p.add_argument("--targets", default="auto",
                   choices=["auto", "all", "assistant", "last-assistant"],
                   help="which tokens get teacher targets: all; assistant (every assistant turn "
                        "of a conversation); last-assistant; auto = assistant for conversations "
                        "(records with 'messages' or 'prompt'/'response'), all for plain text")
    p.add_argument("--builtin-documents", type=int, default=400,
                   help="size of the built-in corpus (with --corpus builtin)")
    p.add_argument("--windows-per-shard", type=int, default=16)
    p.add_argument("--shuffle-buffer", type=int, default=4096, help="documents shuffled together")
    p.add_argument("--codec", default=None, help="target codec (default: the formats default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--vllm-path", default="pooler", choices=["pooler", "prompt-logprobs"],
                   help="pooler (default): the model's own logits and top-k inside vLLM's "
                        "worker, on its device; prompt-logprobs: vLLM's own prompt log-probs")
    p.add_argument("--bos-id", type=int, default=None)
    p.add_argument("--eos-id", type=int, default=None)
    p.add_argument("--max-retries", type=int, default=3, help="retries of a shard whose actor died")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM-CPU KV cache size")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset of another configuration in --out (by default it is "
                        "refused; the same configuration resumes)")
    p.add_argument("--json", action="store_true", help="print one JSON line (no progress bar)")
    p.set_defaults(handler=_run_dump)

    p = subparsers.add_parser(
        "generate", help="the teacher writes responses to prompts (a chat corpus for the dump)",
        description="Render each prompt (JSONL/Parquet records with 'messages' or 'prompt', or "
                    "plain text as one user turn; trailing assistant turns are replaced) with the "
                    "teacher's chat template, sample the teacher's response with vLLM on Ray "
                    "actors, and write a JSONL chat corpus. Resumable: finished parts are kept "
                    "under OUT.parts/ and skipped on a re-run. With --dump DIR the dump runs on "
                    "the result right after (targets on the assistant turns).")
    p.add_argument("--model", required=True, help="teacher: a Hugging Face model directory")
    p.add_argument("--prompts", required=True,
                   help="prompts file, folder, glob or fsspec URL, or 'builtin-chat'")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=256, help="longest response, in tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed + i)")
    p.add_argument("--text-field", default="text", help="field of plain-text prompts")
    p.add_argument("--builtin-documents", type=int, default=400,
                   help="prompts from --prompts builtin-chat")
    p.add_argument("--prompts-per-part", type=int, default=256,
                   help="prompts per resumable part")
    p.add_argument("--max-model-len", type=int, default=4096,
                   help="longest prompt + response the engine accepts")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--workers", type=int, default=1, help="Ray actors, one vLLM engine each")
    p.add_argument("--ray-address", default=None, help="join a Ray cluster (default: local)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM-CPU KV cache size")
    p.add_argument("--dump", default=None, metavar="DIR",
                   help="then dump the teacher's targets for the generated corpus into DIR")
    p.add_argument("--k", type=int, default=64, help="with --dump: top-k entries per token")
    p.add_argument("--window", type=int, default=8192, help="with --dump: tokens per window")
    p.add_argument("--mode", default="document", choices=["causal", "document",
                                                           "document-global"],
                   help="with --dump: packing mode")
    p.add_argument("--engine", default="vllm", choices=["vllm", "hf"],
                   help="with --dump: teacher engine")
    p.add_argument("--targets", default="assistant",
                   choices=["all", "assistant", "last-assistant"],
                   help="with --dump: which tokens get targets")
    p.add_argument("--json", action="store_true", help="print one JSON line (no progress bar)")
    p.set_defaults(handler=_run_generate)

    bench = subparsers.add_parser(
        "bench", help="benchmarks (see BENCHMARKS.md)",
        description="Benchmarks that print one JSON line with a baseline side by side.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    p = bench_sub.add_parser(
        "dump", help="top-k extraction throughput against prefill + unavoidable work",
        description="Measure dump throughput (top-k computed, converted, encoded and written to "
                    "shards) against a ceiling: the same engine's prefill-only throughput on the "
                    "same windows combined with the time of the lm_head matmul plus a logsumexp "
                    "and top-k pass over every token (chunked PyTorch, same threads). Also runs "
                    "vLLM's prompt-logprobs path as the baseline. Engine start-up is excluded.")
    p.add_argument("--model", required=True, help="teacher model directory")
    p.add_argument("--corpus", default="builtin")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--windows", type=int, default=4, help="windows to time")
    p.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    p.add_argument("--mode", default="causal", choices=["causal", "document"],
                   help="packing mode of the timed windows")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (median)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's share of the GPU per engine (default: vLLM's, or what is free)")
    p.add_argument("--no-baseline", action="store_true", help="skip the prompt-logprobs baseline")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="engine dtype (bfloat16 on a GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(handler=_run_bench_dump)
    bench.set_defaults(handler=lambda args: (bench.print_help(), 2)[1])


def _run_make_teacher(args: argparse.Namespace) -> int:
    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

    cfg = TeacherConfig.preset(args.preset, train_seconds=args.train_seconds, seed=args.seed)
    summary = build_teacher(args.out, cfg, log=(lambda m: None) if args.json else print)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"kdcache make-teacher: {args.out}: {summary['parameters']:,} parameters, "
              f"vocab {cfg.vocab_size}, {summary['train_steps']} training steps "
              + (f"(final loss {summary['final_loss']:.3f}), " if summary["final_loss"] is not None
                 else "(untrained), ") + f"{summary['seconds']} s")
    return 0


def _run_dump(args: argparse.Namespace) -> int:
    from kdcache.teacher_dump.plan import DumpConfig
    from kdcache.teacher_dump.runner import format_summary, run_dump

    cfg = DumpConfig.from_options(
        model=args.model, corpus=args.corpus, out=args.out, k=args.k, window=args.window,
        mode=args.mode, engine=args.engine, seed=args.seed,
        split_long_docs=not args.drop_long_docs, shuffle_buffer=args.shuffle_buffer,
        text_field=args.text_field, targets=args.targets, builtin_documents=args.builtin_documents,
        windows_per_shard=args.windows_per_shard, codec=args.codec, dtype=args.dtype,
        vllm_path=args.vllm_path, bos_id=args.bos_id, eos_id=args.eos_id, workers=args.workers,
        tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel,
        gpu_memory_utilization=args.gpu_memory_utilization, ray_address=args.ray_address,
        max_retries=args.max_retries, kv_cache_gib=args.kv_cache_gib, progress=not args.json,
        draws=_sampled_draws(args), temperature=args.temperature, in_process=args.no_ray,
        engines_per_gpu=args.engines_per_gpu, encode_workers=args.encode_workers)
    summary = run_dump(cfg, log=(lambda m: None) if args.json else print,
                       overwrite=args.overwrite)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def _sampled_draws(args: argparse.Namespace) -> int:
    """Draws per position for --kind sampled (0 for top-k), checked before anything is written."""
    if args.kind == "topk":
        if args.draws is not None:
            raise ConfigMismatchError("--draws needs --kind sampled")
        return 0
    if args.draws is None or args.draws < 1:
        raise ConfigMismatchError("--kind sampled needs --draws N (N >= 1 draws per position)")
    if args.engine != "vllm" or args.vllm_path != "pooler":
        raise ConfigMismatchError("--kind sampled draws on the teacher's device inside vLLM: "
                                  "use --engine vllm --vllm-path pooler")
    if not args.temperature > 0:
        raise ConfigMismatchError(f"--temperature must be > 0, got {args.temperature}")
    return int(args.draws)


def _run_generate(args: argparse.Namespace) -> int:
    from kdcache.teacher_dump.generate import GenerateConfig, format_summary, run_generate

    cfg = GenerateConfig(
        model=args.model, prompts=args.prompts, out=args.out, temperature=args.temperature,
        top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed, text_field=args.text_field,
        builtin_documents=args.builtin_documents, prompts_per_part=args.prompts_per_part,
        max_model_len=args.max_model_len, dtype=args.dtype, workers=args.workers,
        ray_address=args.ray_address, kv_cache_gib=args.kv_cache_gib, progress=not args.json)
    dump_cfg = None
    if args.dump is not None:  # validated before anything is generated
        from kdcache.teacher_dump.plan import DumpConfig

        dump_cfg = DumpConfig.from_options(
            model=args.model, corpus=args.out, out=args.dump, k=args.k, window=args.window,
            mode=args.mode, engine=args.engine, seed=args.seed, targets=args.targets,
            dtype=args.dtype, workers=args.workers, ray_address=args.ray_address,
            kv_cache_gib=args.kv_cache_gib, progress=not args.json)
    log = (lambda m: None) if args.json else print
    summary = run_generate(cfg, log=log)
    result: dict = {"generate": summary}
    if not args.json:
        print(format_summary(summary))
    if dump_cfg is not None:
        from kdcache.teacher_dump.runner import format_summary as dump_summary, run_dump

        result["dump"] = run_dump(dump_cfg, log=log)
        if not args.json:
            print(dump_summary(result["dump"]))
    if args.json:
        print(json.dumps(result))
    return 0


def _run_bench_dump(args: argparse.Namespace) -> int:
    from kdcache.teacher_dump.bench import BenchConfig, bench_dump

    result = bench_dump(BenchConfig(model=args.model, corpus=args.corpus, k=args.k,
                                    window=args.window, windows=args.windows, engine=args.engine,
                                    rounds=args.rounds, baseline=not args.no_baseline,
                                    dtype=args.dtype, mode=args.mode,
                                    gpu_memory_utilization=args.gpu_memory_utilization))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return 0
