"""The dump plan (teacher_dump/plan.py) on its own: what counts as the same dump, how a
different one is refused, and the plan and progress records a resume relies on. No engine
runs here; test_runner.py resumes real dumps through these records."""

import json
import os
import subprocess
import sys

import pytest

from kdcache.errors import ConfigMismatchError, FormatError
from kdcache.formats.storage import TMP_MARKER
from kdcache.teacher_dump.plan import (PLAN_NAME, DumpConfig, DumpError, Plan, check_against,
                                       check_teacher_limits, completed_shards, discard_dataset,
                                       load_plan, mark_done, teacher_fingerprint, write_plan)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model_dir(path, vocab_size=300, positions=1024, weights=b"w" * 4096):
    """A directory with what the plan reads of a teacher: config.json, a tokenizer, weights."""
    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab_size,
              "max_position_embeddings": positions}
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    with open(os.path.join(path, "tokenizer.json"), "w") as fh:
        fh.write('{"model": {"vocab": {}}}')
    with open(os.path.join(path, "model.safetensors"), "wb") as fh:
        fh.write(weights)
    return str(path)


def _config(model, out, **options):
    kw = dict(model=str(model), corpus="builtin", out=str(out), k=8, window=256, engine="hf",
              windows_per_shard=2, codec="raw")
    kw.update(options)
    return DumpConfig.from_options(**kw)


def _plan(cfg, teacher=None, shards=2):
    return Plan(config=cfg.identity(), execution=cfg.execution_options(),
                corpus={"name": "builtin", "xxh3": "c0ffee"},
                teacher=teacher or {"name": "t", "path": "/models/t", "config_hash": "aa"},
                shards=[{"name": f"shard-{i:05d}", "windows": [2 * i, 2 * i + 2], "tokens": 512}
                        for i in range(shards)])


# -- configuration identity ------------------------------------------------------------------

@pytest.mark.parametrize("draws", [0, 4])
def test_options_are_the_inverse_of_from_options(tmp_path, draws):
    sampled = {"draws": draws, "temperature": 0.7} if draws else {}
    cfg = _config(tmp_path / "m", tmp_path / "out", seed=3, workers=2, mode="causal", bos_id=1,
                  eos_id=2, **sampled)
    assert DumpConfig.from_options(**cfg.options()) == cfg
    assert (cfg.pack.window, cfg.teacher.window, cfg.pack.seed, cfg.teacher.seed) == (256, 256, 3, 3)


def test_execution_settings_are_not_part_of_the_identity(tmp_path):
    cfg = _config(tmp_path / "m", tmp_path / "out")
    moved = _config(tmp_path / "m", tmp_path / "elsewhere", workers=4, tensor_parallel=2,
                    ray_address="10.0.0.1:6379", max_retries=9, kv_cache_gib=4.0, device="cpu",
                    progress=False, gpu_memory_utilization=0.5)
    assert moved.identity() == cfg.identity()
    assert moved.execution_options() != cfg.execution_options()
    assert moved.execution_options()["workers"] == 4
    for option in DumpConfig.EXECUTION_OPTIONS:
        assert option not in cfg.identity()


@pytest.mark.parametrize("change", [{"k": 4}, {"window": 512}, {"mode": "causal"}, {"seed": 1},
                                    {"codec": "qrank"}, {"windows_per_shard": 3},
                                    {"builtin_documents": 25}, {"targets": "all"},
                                    {"dtype": "bfloat16"}, {"engine": "vllm"}, {"draws": 2}])
def test_every_target_setting_is_part_of_the_identity(tmp_path, change):
    base = _config(tmp_path / "m", tmp_path / "out")
    assert _config(tmp_path / "m", tmp_path / "out", **change).identity() != base.identity()


def test_identity_paths_are_absolute_and_builtin_size_only_for_builtin_corpora(tmp_path,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n')
    cfg = _config("m", "out", corpus="docs.jsonl")
    identity = cfg.identity()
    assert identity["model"] == str(tmp_path / "m")
    assert identity["corpus"] == str(tmp_path / "docs.jsonl")
    assert "builtin_documents" not in identity
    assert _config("m", "out").identity()["builtin_documents"] == 400
    # a top-k dump's identity has no sampling keys (plans written before they existed match)
    assert "draws" not in identity and "temperature" not in identity
    remote = _config("m", "out", corpus="s3://bucket/docs.jsonl").identity()
    assert remote["corpus"] == "s3://bucket/docs.jsonl"


@pytest.mark.parametrize("options, message", [
    ({"workers": 0}, "--workers must be at least 1, got 0"),
    ({"k": 0}, "--k must be at least 1, got 0"),
    ({"windows_per_shard": 0}, "--windows-per-shard must be at least 1, got 0"),
    ({"tensor_parallel": 0}, "--tensor-parallel must be at least 1, got 0"),
    ({"gpu_memory_utilization": 1.5}, r"--gpu-memory-utilization is a fraction .* got 1.5"),
])
def test_impossible_settings_are_refused_when_the_config_is_built(tmp_path, options, message):
    with pytest.raises(DumpError, match=message):
        _config(tmp_path / "m", tmp_path / "out", **options)


# -- a different dump is refused, naming every difference ------------------------------------

def test_the_same_plan_passes_and_a_different_one_names_each_difference(tmp_path):
    cfg = _config(tmp_path / "m", tmp_path / "out")
    existing = _plan(cfg)
    check_against(existing, _plan(_config(tmp_path / "m", tmp_path / "out", workers=3)), "p")
    changed = _plan(_config(tmp_path / "m", tmp_path / "out", k=4, seed=2),
                    teacher={"name": "t", "path": "/models/t", "config_hash": "bb"})
    changed.corpus["xxh3"] = "beef"
    with pytest.raises(ConfigMismatchError) as caught:
        check_against(existing, changed, where="ds/plan.json")
    message = str(caught.value)
    assert message.startswith("ds/plan.json: this output directory holds a dump with a "
                              "different configuration; refusing to mix targets.")
    for line in ("config.k: plan has 8, this run has 4", "config.seed: plan has 0, this run has 2",
                 "corpus.xxh3: plan has 'c0ffee', this run has 'beef'",
                 "teacher.config_hash: plan has 'aa', this run has 'bb'"):
        assert f"\n  {line}" in message
    assert "config.workers" not in message
    assert message.endswith("Use a new --out directory, or pass --overwrite to replace this one.")


def test_a_moved_teacher_with_the_same_fingerprint_is_the_same_teacher(tmp_path):
    first = _model_dir(tmp_path / "a" / "teacher")
    second = tmp_path / "b" / "teacher"
    os.makedirs(second.parent)
    os.rename(first, second)
    cfg = _config(second, tmp_path / "out")
    before = _plan(cfg, teacher={**teacher_fingerprint(str(second)), "path": first})
    check_against(before, _plan(cfg, teacher=teacher_fingerprint(str(second))), "p")


def test_teacher_fingerprint_follows_config_tokenizer_and_weights(tmp_path):
    model = _model_dir(tmp_path / "t")
    original = teacher_fingerprint(model)
    assert (original["name"], original["vocab_size"], original["weights_bytes"]) == ("t", 300, 4096)
    assert original["architecture"] == "LlamaForCausalLM"
    assert teacher_fingerprint(model) == original
    changes = {"config.json": lambda p: _model_dir(tmp_path / "t", vocab_size=301),
               "tokenizer.json": lambda p: open(p, "a").write(" "),
               "model.safetensors": lambda p: _model_dir(tmp_path / "t", weights=b"v" + b"w" * 4095)}
    for name, change in changes.items():
        before = teacher_fingerprint(model)
        change(os.path.join(model, name))
        after = teacher_fingerprint(model)
        key = {"config.json": "config_hash", "tokenizer.json": "tokenizer_hash",
               "model.safetensors": "weights_hash"}[name]
        assert after[key] != before[key], name
    with pytest.raises(FormatError, match="not a model directory"):
        teacher_fingerprint(str(tmp_path))


def test_teacher_limits_are_checked_before_anything_is_written(tmp_path):
    model = _model_dir(tmp_path / "t", vocab_size=300, positions=512)
    check_teacher_limits(_config(model, tmp_path / "out", k=300, window=512))
    with pytest.raises(DumpError, match=r"--k 301 exceeds the teacher's vocabulary \(300 ids"):
        check_teacher_limits(_config(model, tmp_path / "out", k=301))
    with pytest.raises(DumpError, match="--window 1024 exceeds the teacher's 512 positions "
                                        r"\(max_position_embeddings in .*\); pass --window 512"):
        check_teacher_limits(_config(model, tmp_path / "out", window=1024))
    with pytest.raises(FormatError, match="not a model directory"):
        check_teacher_limits(_config(tmp_path / "nothing", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# -- plan.json -------------------------------------------------------------------------------

def test_plan_round_trips_and_gets_its_creation_time(tmp_path):
    root = str(tmp_path / "ds")
    assert load_plan(root) is None
    plan = _plan(_config(tmp_path / "m", root))
    write_plan(root, plan)
    loaded = load_plan(root)
    assert loaded == plan and loaded.created_at.endswith("+00:00")
    body = json.loads((tmp_path / "ds" / PLAN_NAME).read_text())
    assert (body["format"], body["version"]) == ("kdcache-dump-plan", 1)
    assert [p.name for p in (tmp_path / "ds").iterdir()] == [PLAN_NAME]  # no temporary left


@pytest.mark.parametrize("body, message", [
    (b"{not json", "invalid plan"),
    (json.dumps({"format": "something-else"}).encode(), "invalid plan: not a kdcache dump plan"),
    (json.dumps({"format": "kdcache-dump-plan", "version": 2}).encode(),
     "invalid plan: unsupported plan version 2"),
    (json.dumps({"format": "kdcache-dump-plan", "version": 1, "config": {}}).encode(),
     "invalid plan: 'execution'"),
    (b"[1, 2]", "invalid plan: not a kdcache dump plan"),
])
def test_a_damaged_plan_is_a_format_error_naming_the_file(tmp_path, body, message):
    (tmp_path / PLAN_NAME).write_bytes(body)
    with pytest.raises(FormatError, match=rf"{PLAN_NAME}: {message}"):
        load_plan(str(tmp_path))


def test_a_failed_plan_write_leaves_the_previous_plan_whole(tmp_path):
    """A plan rewritten under a 4 KiB file-size quota fails; the plan on disk is the old one,
    complete, and no temporary file is left beside it."""
    root = tmp_path / "ds"
    small = _plan(_config(tmp_path / "m", root))
    write_plan(str(root), small)
    before = (root / PLAN_NAME).read_bytes()
    script = f"""
import resource, signal, sys
sys.path.insert(0, {ROOT!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from kdcache.teacher_dump.plan import load_plan, write_plan
plan = load_plan({str(root)!r})
plan.shards = [dict(plan.shards[0], name=f"shard-{{i:05d}}") for i in range(500)]
try:
    write_plan({str(root)!r}, plan)
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert "StorageError" in out.stdout and "File too large" in out.stdout, out
    assert (root / PLAN_NAME).read_bytes() == before
    assert load_plan(str(root)) == small
    assert [p.name for p in root.iterdir()] == [PLAN_NAME]


# -- completed shards ------------------------------------------------------------------------

def _shard_file(root, name, size):
    path = root / "shards" / f"{name}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def test_a_shard_is_complete_only_with_its_record_and_its_whole_file(tmp_path):
    root = tmp_path / "ds"
    assert completed_shards(str(root)) == {}
    for i in range(4):
        _shard_file(root, f"shard-{i:05d}", 100)
        mark_done(str(root), f"shard-{i:05d}", {"name": f"shards/shard-{i:05d}.arrow",
                                                 "bytes": 100, "windows": 2})
    _shard_file(root, "shard-00004", 100)  # written, but the driver never recorded it
    assert sorted(completed_shards(str(root))) == [f"shard-{i:05d}" for i in range(4)]
    assert completed_shards(str(root))["shard-00002"] == {"name": "shards/shard-00002.arrow",
                                                          "bytes": 100, "windows": 2}
    (root / "shards" / "shard-00001.arrow").write_bytes(b"x" * 60)  # truncated since
    os.remove(root / "shards" / "shard-00002.arrow")  # lost since
    (root / "progress" / "shard-00003.json").write_text("{trunc")  # a record cut short
    (root / "progress" / f"shard-00000.json{TMP_MARKER}1234").write_text("{}")  # a write in flight
    (root / "progress" / "notes.txt").write_text("not a record")
    assert list(completed_shards(str(root))) == ["shard-00000"]


def test_discard_removes_what_a_dump_wrote_and_nothing_else(tmp_path):
    root = tmp_path / "ds"
    write_plan(str(root), _plan(_config(tmp_path / "m", root)))
    _shard_file(root, "shard-00000", 10)
    mark_done(str(root), "shard-00000", {"bytes": 10})
    for name in ("manifest.json", "README.md", "codec/table.bin", "card/targets.png",
                 "mine.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    discard_dataset(str(root))
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == ["mine.txt"]
