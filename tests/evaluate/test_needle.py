"""Needle prompts (exact lengths, depths, distances), scoring, engines, and `kdcache eval needle`."""

import json
import os
import random

import pytest
import torch
from transformers import AutoTokenizer

from kdcache.cli import main
from kdcache.evaluate.needle import aggregate, distance_bin
from kdcache.evaluate.needle_tasks import (TASKS, Haystack, build_sample, build_samples,
                                           score)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("values", ["numbers", "words", "uuids"])
def test_prompts_have_exact_length_and_needles_where_claimed(tokenizer, task, values):
    haystack = Haystack(tokenizer)
    for length in (900, 1337):
        for depth in (0.0, 0.5, 1.0):
            s = build_sample(tokenizer, haystack, task, values, length, depth,
                             random.Random(f"{task}{values}{length}{depth}"))
            assert len(s.input_ids) == length
            assert s.input_ids[0] == tokenizer.bos_token_id
            text = tokenizer.decode(s.input_ids)
            for answer in s.answers:
                assert answer in text
            for i in s.queried:
                start, end = s.needle_spans[i]
                needle = tokenizer.decode(s.input_ids[start:end])
                assert any(a in needle for a in s.answers)
            question = tokenizer.decode(s.input_ids[length - s.distance - 60:])
            assert "pass key?" in question or "special magic" in question
            if task in ("niah_multivalue", "niah_multiquery"):
                assert len(s.answers) == 4
            else:
                assert len(s.answers) == 1


def test_depth_orders_distance_and_user_haystack(tokenizer):
    samples = build_samples(tokenizer, "niah_single", "words", [1024], [0.0, 0.5, 1.0], 1)
    d0, d5, d1 = (s.distance for s in samples)
    assert d0 > d5 > d1 and d1 <= 2
    # Placement is at a sentence boundary near the requested fraction of the haystack.
    assert abs(d5 - d0 / 2) < 0.1 * d0
    docs = ["Alpha beta gamma. Delta epsilon zeta! Eta theta iota?"]
    s = build_samples(tokenizer, "passkey", "numbers", [600], [0.3], 1, haystack_texts=docs)[0]
    assert len(s.input_ids) == 600 and "Delta epsilon zeta!" in tokenizer.decode(s.input_ids)
    again = build_samples(tokenizer, "passkey", "numbers", [600], [0.3], 1, haystack_texts=docs)[0]
    assert again.input_ids == s.input_ids  # seeded: same config, same prompts


def test_scoring():
    assert score("passkey", " 48213. Remember", ["48213"]) == 1.0
    assert score("passkey", " 482130", ["48213"]) == 0.0
    assert score("passkey", " the key 1 is 48213", ["48213"]) == 0.0  # first integer counts
    assert score("niah_multivalue", "are: 111, 333 and 222", ["111", "222", "333", "444"]) == 0.75
    assert score("niah_single", "ABC-Def", ["abc-def"]) == 1.0


def test_aggregate_bins_and_heatmap():
    records = [{"length": 256, "depth": 0.0, "distance": 200, "score": 1.0},
               {"length": 256, "depth": 1.0, "distance": 0, "score": 0.0},
               {"length": 512, "depth": 0.0, "distance": 450, "score": 0.5},
               {"length": 512, "depth": 1.0, "distance": 1, "score": 1.0}]
    agg = aggregate(records, [256, 512], [0.0, 1.0])
    assert agg["heatmap"] == [[1.0, 0.5], [0.0, 1.0]]
    assert agg["by_length"] == {"256": 0.5, "512": 0.75}
    assert [(b["bin"], b["accuracy"], b["count"]) for b in agg["by_distance"]] == [
        (0, 0.5, 2), (7, 1.0, 1), (8, 0.5, 1)]
    assert distance_bin(1024) == 10 and distance_bin(1023) == 9


def test_hf_engine_is_greedy(tiny_model_dir, tokenizer):
    """Batched generate equals a hand-written argmax loop on each prompt."""
    from kdcache.evaluate.generate import HFGenerator

    gen = HFGenerator(tiny_model_dir, batch_size=3)
    prompts = [s.input_ids for s in build_samples(tokenizer, "passkey", "numbers", [300, 320],
                                                  [0.2, 0.8], 2)]
    texts = gen.generate(prompts, max_new_tokens=5)
    model = gen.loaded.model
    for prompt, text in zip(prompts[:3], texts[:3]):
        ids = torch.tensor([prompt])
        new = []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                if nxt == tokenizer.eos_token_id:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert text == tokenizer.decode(new, skip_special_tokens=True)


def test_eval_needle_cli_two_models(tiny_model_dir, tiny_model_dir_b, tmp_path):
    out = str(tmp_path / "needle")
    rc = main(["eval", "needle", tiny_model_dir, tiny_model_dir_b, "--out", out,
               "--engine", "hf", "--task", "passkey,niah_multikey", "--values", "uuids",
               "--lengths", "640,800", "--depths", "3", "--samples", "1",
               "--max-new-tokens", "4"])
    assert rc == 0
    with open(os.path.join(out, "needle.json")) as f:
        result = json.load(f)
    assert [m["name"] for m in result["models"]] == ["tiny-llama", "tiny-llama-b"]
    assert len(result["plots"]) == 4
    for name in result["plots"]:
        assert os.path.getsize(os.path.join(out, name)) > 10_000
    for m in result["models"]:
        for task in ("passkey", "niah_multikey"):
            data = m["tasks"][task]
            assert len(data["samples"]) == 6
            for s in data["samples"]:
                assert s["score"] == score(task, s["output"], s["answers"])
            assert sum(b["count"] for b in data["by_distance"]) == 6
            assert len(data["heatmap"]) == 3 and len(data["heatmap"][0]) == 2


def test_eval_needle_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", "needle", tiny_model_dir, "--out", str(tmp_path), "--engine", "hf",
                 "--lengths", "64"]) == 2
    assert "too short for passkey" in capsys.readouterr().err
    assert main(["eval", "needle", tiny_model_dir, "--out", str(tmp_path), "--task", "nope"]) == 2
    assert "unknown needle task" in capsys.readouterr().err
    assert main(["eval", "needle", tiny_model_dir, "--out", str(tmp_path), "--engine", "hf",
                 "--haystack", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


@pytest.mark.slow
def test_vllm_engine_agrees_with_transformers(tiny_model_dir, tokenizer):
    pytest.importorskip("vllm")
    from kdcache.evaluate.generate import HFGenerator, VLLMGenerator

    prompts = [s.input_ids for s in build_samples(tokenizer, "niah_single", "numbers", [400],
                                                  [0.0, 0.5, 1.0], 2)]
    hf = HFGenerator(tiny_model_dir).generate(prompts, max_new_tokens=6)
    engine = VLLMGenerator(tiny_model_dir, max_len=512)
    try:
        vl = engine.generate(prompts, max_new_tokens=6)
    finally:
        engine.close()
    same = sum(a == b for a, b in zip(hf, vl))
    assert same >= len(prompts) - 1, list(zip(hf, vl))


def test_run_names_are_unique_whatever_the_paths():
    from kdcache.evaluate.models import unique_labels

    runs = ["runs/a/s1/hf", "runs/b/s1/hf", "other/b/s1/hf", "models/tiny"]
    labels = unique_labels(runs)
    assert len(set(labels)) == 4 and labels[3] == "tiny"
    assert labels[0] == "a/s1/hf"  # as short as stays distinct


def test_needle_past_the_models_positions_is_said(tiny_model_dir, tmp_path, caplog):
    import shutil

    from kdcache.evaluate.needle import NeedleConfig, run_needle

    short = tmp_path / "short-context"
    shutil.copytree(tiny_model_dir, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    cfg = NeedleConfig(tasks=("passkey",), lengths=(640,), depths=(0.5,), samples=1,
                       max_new_tokens=4, engine="hf")
    with caplog.at_level("WARNING", logger="kdcache.eval"):
        result = run_needle([str(short)], cfg)
    assert len(result["warnings"]) == 1
    assert "exceed the model's 512 positions (max_position_embeddings)" in result["warnings"][0]
    assert "512 positions" in caplog.text
