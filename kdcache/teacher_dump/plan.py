"""The dump plan: configuration, fingerprints and shard layout, written before any shard.

`plan.json` sits at the dataset root. It records
- `config`: every setting that changes the targets (teacher, corpus, k, window, mode, seed,
  packing options, engine, dtype, codec, windows per shard), as the flat `kdcache dump` options;
- `execution`: settings that do not (workers, tensor parallel, Ray address), free to change
  between an interrupted run and its resume;
- fingerprints of the corpus (file names, sizes, a hash of every byte) and of the teacher (config,
  tokenizer, weight file names, sizes and head/tail hashes);
- `shards`: the deterministic layout, shard name -> windows and tokens, from a first packing pass.

A re-run in the same directory loads the plan and refuses (ConfigMismatchError) if any
target-changing setting or fingerprint differs, so that targets from two configurations are
never mixed in one dataset. Completed shards are marked by `progress/<shard>.json` (their
manifest entries), written by the driver after the shard file is in place.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from kdcache.errors import ConfigMismatchError, FormatError, KdcacheError
from kdcache.formats import storage
from kdcache.formats.card import FIGURE_PATH
from kdcache.formats.manifest import CARD_NAME, MANIFEST_NAME, SHARD_DIR, TABLE_PATH
from kdcache.formats.writer import shard_path
from kdcache.model_config import max_positions
from kdcache.teacher_dump.corpus import BUILTINS, CorpusSpec
from kdcache.teacher_dump.engines.base import EngineConfig
from kdcache.teacher_dump.pack import PackConfig, tokenizer_hash

PLAN_NAME = "plan.json"
PROGRESS_DIR = "progress"
PLAN_FORMAT = "kdcache-dump-plan"
PLAN_VERSION = 1


class DumpError(KdcacheError):
    """The dump cannot run or could not complete (bad options, an actor kept dying, no Ray)."""


@dataclass(frozen=True)
class ExecutionConfig:
    """How a dump runs; free to change between an interrupted run and its resume."""

    workers: int = 1  # engines (Ray actors)
    ray_address: str | None = None  # None: a local Ray
    max_retries: int = 3  # retries of a shard whose actor died
    progress: bool = True  # a progress bar on stderr
    in_process: bool = False  # one engine in this process, no Ray (a single machine)
    engines_per_gpu: int = 1  # > 1: single-GPU engines share GPUs (asked for, never by default)
    encode_workers: int | None = None  # encoding processes per engine; None: its CPUs up to 16


@dataclass(frozen=True)
class DumpConfig:
    """One `kdcache dump` run: its corpus, packing, teacher engine, output and execution.

    The parts are the configs their components take as they are (no copying between them);
    `from_options` builds them from the CLI's flat options, setting shared values (window,
    seed) once. `identity()` is what must not change between a run and its resume.
    """

    corpus: CorpusSpec
    pack: PackConfig
    teacher: EngineConfig
    out: str
    engine: str = "vllm"  # which engine serves `teacher` ("vllm" or "hf")
    windows_per_shard: int = 16
    codec: str | None = None  # None: the formats default for top-k
    execution: ExecutionConfig = ExecutionConfig()

    def __post_init__(self) -> None:
        t = self.teacher
        for option, value in (("--workers", self.execution.workers),
                              ("--tensor-parallel", t.tensor_parallel),
                              ("--pipeline-parallel", t.pipeline_parallel),
                              ("--windows-per-shard", self.windows_per_shard),
                              ("--engines-per-gpu", self.execution.engines_per_gpu),
                              ("--encode-workers", 1 if self.execution.encode_workers is None
                               else self.execution.encode_workers),
                              ("--k", t.k)):
            if value < 1:
                raise DumpError(f"{option} must be at least 1, got {value}")
        x = self.execution
        if x.in_process and (x.workers != 1 or x.ray_address or x.engines_per_gpu != 1):
            raise DumpError("--no-ray runs one engine in this process: it takes neither "
                            f"--workers {x.workers}, --engines-per-gpu {x.engines_per_gpu} nor "
                            "--ray-address; drop one or the other")
        if t.gpu_memory_utilization is not None and not 0 < t.gpu_memory_utilization <= 1:
            raise DumpError("--gpu-memory-utilization is a fraction of each GPU's memory in "
                            f"(0, 1], got {t.gpu_memory_utilization}")
        share = x.engines_per_gpu
        if share > 1 and t.tensor_parallel * t.pipeline_parallel > 1:
            raise DumpError("--engines-per-gpu shares a GPU between single-GPU engines; it cannot "
                            "be combined with --tensor-parallel or --pipeline-parallel")
        if share > 1 and self.engine == "vllm" and (t.gpu_memory_utilization is None
                                                    or t.gpu_memory_utilization > 1 / share):
            raise DumpError(f"--engines-per-gpu {share}: each vLLM engine takes its "
                            "--gpu-memory-utilization share of the GPU (vLLM's default 0.9); "
                            f"pass --gpu-memory-utilization {1 / share:.2f} or less")

    @classmethod
    def from_options(cls, *, model: str, corpus: str, out: str, k: int = 64,
                     window: int = 131072, mode: str = "document", engine: str = "vllm",
                     seed: int = 0, split_long_docs: bool = True, shuffle_buffer: int = 4096,
                     text_field: str = "text", targets: str = "auto",
                     builtin_documents: int = 400,
                     windows_per_shard: int = 16, codec: str | None = None,
                     dtype: str = "float32", vllm_path: str = "pooler",
                     bos_id: int | None = None, eos_id: int | None = None, workers: int = 1,
                     tensor_parallel: int = 1, pipeline_parallel: int = 1,
                     gpu_memory_utilization: float | None = None,
                     ray_address: str | None = None, max_retries: int = 3,
                     kv_cache_gib: float = 1.0, device: str = "auto",
                     progress: bool = True, draws: int = 0,
                     temperature: float = 1.0, in_process: bool = False,
                     engines_per_gpu: int = 1,
                     encode_workers: int | None = None) -> "DumpConfig":
        """The config of the CLI's options (same names as the `kdcache dump` flags).
        `draws` > 0 makes a `sampled` dataset (RS-KD: that many draws per position at
        `temperature`, stored as counts) instead of top-k."""
        return cls(
            corpus=CorpusSpec(path=corpus, text_field=text_field,
                              builtin_documents=builtin_documents, builtin_seed=seed),
            pack=PackConfig(window=window, seed=seed, split_long_docs=split_long_docs,
                            shuffle_buffer=shuffle_buffer, bos_id=bos_id, eos_id=eos_id,
                            targets=targets),
            teacher=EngineConfig(model=model, k=k, window=window, mode=mode, dtype=dtype,
                                 tensor_parallel=tensor_parallel,
                                 pipeline_parallel=pipeline_parallel,
                                 gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                                 vllm_path=vllm_path, device=device, kv_cache_gib=kv_cache_gib,
                                 draws=draws, temperature=temperature),
            out=out, engine=engine, windows_per_shard=windows_per_shard, codec=codec,
            execution=ExecutionConfig(workers=workers, ray_address=ray_address,
                                      max_retries=max_retries, progress=progress,
                                      in_process=in_process,
                                      engines_per_gpu=engines_per_gpu,
                                      encode_workers=encode_workers))

    def options(self) -> dict[str, Any]:
        """The flat options this config was built from (inverse of `from_options`)."""
        c, p, t, x = self.corpus, self.pack, self.teacher, self.execution
        # sampled-target settings only when set: top-k plans keep their earlier identity
        sampled = {"draws": t.draws, "temperature": t.temperature} if t.draws else {}
        return dict(**sampled, model=t.model, corpus=c.path, out=self.out, k=t.k,
                    window=p.window,
                    mode=t.mode, engine=self.engine, seed=p.seed,
                    split_long_docs=p.split_long_docs, shuffle_buffer=p.shuffle_buffer,
                    text_field=c.text_field, targets=p.targets,
                    builtin_documents=c.builtin_documents,
                    windows_per_shard=self.windows_per_shard, codec=self.codec, dtype=t.dtype,
                    vllm_path=t.vllm_path, bos_id=p.bos_id, eos_id=p.eos_id,
                    workers=x.workers, tensor_parallel=t.tensor_parallel,
                    pipeline_parallel=t.pipeline_parallel,
                    gpu_memory_utilization=t.gpu_memory_utilization,
                    ray_address=x.ray_address, max_retries=x.max_retries,
                    kv_cache_gib=t.kv_cache_gib, device=t.device, progress=x.progress,
                    in_process=x.in_process, engines_per_gpu=x.engines_per_gpu)

    # settings that do not change the targets (recorded in plan.json, not compared)
    EXECUTION_OPTIONS = ("out", "workers", "tensor_parallel", "pipeline_parallel",
                         "gpu_memory_utilization", "ray_address", "max_retries", "kv_cache_gib",
                         "device", "progress", "in_process", "engines_per_gpu")

    def identity(self) -> dict[str, Any]:
        d = self.options()
        d["model"] = os.path.abspath(self.teacher.model)
        if self.corpus.path not in BUILTINS and "://" not in self.corpus.path:
            d["corpus"] = os.path.abspath(self.corpus.path)
        if self.corpus.path not in BUILTINS:
            d.pop("builtin_documents")
        return {k: v for k, v in d.items() if k not in self.EXECUTION_OPTIONS}

    def execution_options(self) -> dict[str, Any]:
        options = self.options()
        return {k: options[k] for k in self.EXECUTION_OPTIONS}


@dataclass
class Plan:
    config: dict[str, Any]
    execution: dict[str, Any]
    corpus: dict[str, Any]
    teacher: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)  # name, windows, tokens
    packing_stats: dict[str, Any] = field(default_factory=dict)
    corpus_stats: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    def to_json(self) -> bytes:
        body = {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}
        return (json.dumps(body, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Plan":
        try:
            body = json.loads(data)
            if not isinstance(body, dict) or body.get("format") != PLAN_FORMAT:
                raise ValueError("not a kdcache dump plan")
            if body.get("version") != PLAN_VERSION:
                raise ValueError(f"unsupported plan version {body.get('version')}")
            return cls(**{k: body[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{where}: invalid plan: {exc}") from None


def check_teacher_limits(cfg: "DumpConfig") -> None:
    """Refuse a k beyond the teacher's vocabulary or a window beyond its positions, for every
    engine, before anything is written (engines only found out after plan.json: a raw IndexError
    on GPT-2, a vLLM traceback, or RoPE models run silently past their context)."""
    model_dir = cfg.teacher.model
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FormatError(f"{model_dir}: not a model directory (no config.json)")
    try:
        with open(cfg_path, "rb") as fh:
            config = json.loads(fh.read())
        text_cfg = config.get("text_config") or config
        vocab = int(text_cfg["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{cfg_path}: cannot read the teacher's vocab_size: {exc}") from None
    if cfg.teacher.k > vocab:
        raise DumpError(f"--k {cfg.teacher.k} exceeds the teacher's vocabulary ({vocab} ids, "
                        f"{cfg_path})")
    limit = max_positions(text_cfg)
    if limit is not None and cfg.pack.window > limit[1]:
        raise DumpError(f"--window {cfg.pack.window} exceeds the teacher's {limit[1]} "
                        f"positions ({limit[0]} in {cfg_path}); pass --window {limit[1]} or less")


def discard_dataset(root: str) -> None:
    """Remove what a dump writes in `root` (for --overwrite); other files are left alone."""
    fs, base = storage.resolve(root)
    # manifest first: a half-discarded directory must not read as a finished dataset
    for name in (MANIFEST_NAME, PLAN_NAME, CARD_NAME, TABLE_PATH, FIGURE_PATH):
        path = storage.join(base, name)
        if fs.exists(path):
            fs.rm(path)
    for name in (SHARD_DIR, PROGRESS_DIR):
        path = storage.join(base, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def teacher_fingerprint(model_dir: str) -> dict[str, Any]:
    """Config hash, tokenizer hash and a cheap weights hash (names, sizes, 1 MiB head/tail)."""
    import xxhash

    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FormatError(f"{model_dir}: not a model directory (no config.json)")
    with open(cfg_path, "rb") as fh:
        config_bytes = fh.read()
    config = json.loads(config_bytes)
    weights = xxhash.xxh3_64()
    n_bytes = 0
    for name in sorted(os.listdir(model_dir)):
        if not name.endswith((".safetensors", ".bin", ".pt")):
            continue
        path = os.path.join(model_dir, name)
        size = os.path.getsize(path)
        n_bytes += size
        weights.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as fh:
            weights.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                weights.update(fh.read(1 << 20))
    text_cfg = config.get("text_config", config)
    return {
        "name": os.path.basename(os.path.abspath(model_dir)),
        "path": os.path.abspath(model_dir),
        "architecture": (config.get("architectures") or ["?"])[0],
        "vocab_size": int(text_cfg["vocab_size"]),
        "config_hash": xxhash.xxh3_64_hexdigest(config_bytes),
        "tokenizer_hash": tokenizer_hash(model_dir),
        "weights_hash": weights.hexdigest(),
        "weights_bytes": n_bytes,
    }


def _diff(old: dict, new: dict, prefix: str) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "path" and prefix == "teacher":
            continue  # a moved teacher with the same fingerprint is the same teacher
        if old.get(key) != new.get(key):
            out.append(f"{prefix}.{key}: plan has {old.get(key)!r}, this run has {new.get(key)!r}")
    return out


def check_against(existing: Plan, new: Plan, where: str) -> None:
    """Refuse to resume with different targets-defining settings."""
    problems = (_diff(existing.config, new.config, "config")
                + _diff(existing.corpus, new.corpus, "corpus")
                + _diff(existing.teacher, new.teacher, "teacher"))
    if problems:
        raise ConfigMismatchError(
            f"{where}: this output directory holds a dump with a different configuration; "
            "refusing to mix targets. Differences:\n  " + "\n  ".join(problems)
            + "\nUse a new --out directory, or pass --overwrite to replace this one.")


def load_plan(root: str) -> Plan | None:
    fs, base = storage.resolve(root)
    path = storage.join(base, PLAN_NAME)
    if not fs.exists(path):
        return None
    return Plan.from_json(storage.read_bytes(fs, path), where=path)


def write_plan(root: str, plan: Plan) -> None:
    if not plan.created_at:
        plan.created_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    fs, base = storage.resolve(root)
    storage.atomic_write_bytes(fs, storage.join(base, PLAN_NAME), plan.to_json())


def progress_path(base: str, shard_name: str) -> str:
    return storage.join(base, PROGRESS_DIR, f"{shard_name}.json")


def mark_done(root: str, shard_name: str, info: dict[str, Any]) -> None:
    fs, base = storage.resolve(root)
    storage.atomic_write_bytes(fs, progress_path(base, shard_name),
                               (json.dumps(info) + "\n").encode())


def completed_shards(root: str) -> dict[str, dict[str, Any]]:
    """Shards whose file and completion record both exist: name -> ShardInfo dict."""
    fs, base = storage.resolve(root)
    pdir = storage.join(base, PROGRESS_DIR)
    if not fs.exists(pdir):
        return {}
    done = {}
    for p in fs.ls(pdir, detail=False):
        fname = p.rsplit("/", 1)[-1]
        if not fname.endswith(".json") or storage.TMP_MARKER in fname:
            continue
        name = fname[:-5]
        try:
            info = json.loads(storage.read_bytes(fs, p))
        except ValueError:
            continue  # an unreadable record: redo the shard
        shard_file = storage.join(base, shard_path(name))
        if fs.exists(shard_file) and fs.size(shard_file) == info.get("bytes"):
            done[name] = info
    return done
