"""The replicate experiment's retrieval teacher: its curriculum, and that it really retrieves."""

from __future__ import annotations

import json
import os
import random
import re

import pytest

from kdcache.replicate.teacher import (COPY_LENS, MIN_PASSKEY, PROMOTE, Ladder, PasskeyBatches,
                                       _copy_batch, passkey_lengths, teacher_record,
                                       train_retrieval_teacher)

SMOKE_MODEL = dict(vocab_size=1024, tokenizer_vocab=1024, hidden_size=128, intermediate_size=384,
                   num_layers=2, num_heads=2, num_kv_heads=1, max_positions=4096)


def test_the_length_ladder_starts_at_the_shortest_prompt_and_ends_at_the_context():
    assert passkey_lengths(512) == [MIN_PASSKEY, 256, 512]
    assert passkey_lengths(16384)[0] == MIN_PASSKEY and passkey_lengths(16384)[-1] == 16384
    assert passkey_lengths(700) == [MIN_PASSKEY, 256, 512, 700]
    assert passkey_lengths(MIN_PASSKEY - 1) == []  # too short for a prompt: text and copying


def test_the_next_rung_opens_only_when_the_longest_open_one_is_answered():
    ladder = Ladder([176, 256, 512], random.Random(0))
    assert {ladder.pick() for _ in range(50)} == {176}
    for step in range(20):  # wrong answers: stays
        assert not ladder.update(176, [False] * 8, 1.0, step, 1.0)
    opened = False
    for step in range(20, 80):
        opened = ladder.update(176, [True] * 8, 0.1, step, 2.0) or opened
        if opened:
            break
    assert opened and ladder.open == 2 and ladder.stats[176]["accuracy"] >= PROMOTE
    assert {ladder.pick() for _ in range(200)} == {176, 256}
    assert not ladder.update(176, [True] * 8, 0.1, 99, 3.0)  # a shorter rung opens nothing
    summary = ladder.summary()
    assert summary["longest_open"] == 256 and summary["opened"][-1]["length"] == 256
    json.dumps(summary)


def test_copy_rows_repeat_a_span_of_varying_length_labelled_by_content():
    """One copied length for every row is learnt as a fixed offset back, not as retrieval."""
    import torch

    ids, labels = _copy_batch(1024, 8192, 512, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape and ids.shape[1] == 2 * COPY_LENS[1] + 1
    assert (ids[:, 0] == 1).all()
    spans = set()
    for row, lab in zip(ids.tolist(), labels.tolist()):
        at = [i for i, t in enumerate(lab) if t != -100]
        n = len(at) + 1  # the repeat's first token is not labelled: it cannot be foreseen
        assert at == list(range(n + 2, 2 * n + 1))
        assert row[1 + n:1 + 2 * n] == row[1:1 + n] and all(lab[i] == row[i] for i in at)
        spans.add(n)
    assert len(spans) > 10 and min(spans) >= COPY_LENS[0] and max(spans) <= COPY_LENS[1]
    short, _ = _copy_batch(1024, 1024, 40, torch.Generator().manual_seed(0))
    assert short.shape[1] == 40  # rows fit a short context


def test_passkey_rows_are_the_evaluation_prompt_with_labels_on_needle_and_answer(tmp_path):
    from transformers import AutoTokenizer

    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

    build_teacher(str(tmp_path), TeacherConfig(**SMOKE_MODEL), log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids, labels, answer = PasskeyBatches(tok, 1024, seed=0).batch(256)
    assert ids.shape == labels.shape == answer.shape == (4, 256)
    for row, lab, ans in zip(ids.tolist(), labels.tolist(), answer.tolist()):
        text = tok.decode(row)
        key = text.split("The pass key is ")[1][:5]
        assert "What is the pass key? The pass key is " + key + ".</s>" in text
        answer_text = tok.decode([t for t, a in zip(row, ans) if a])
        assert answer_text == " " + key + ".</s>"
        labelled = tok.decode([t for t in lab if t != -100])
        assert labelled.startswith(" The pass key is " + key) and labelled.endswith(key + ".</s>")


def test_document_rows_are_fresh_documents_of_the_students_kinds_with_every_token_labelled(
        tmp_path):
    """The teacher trains on the students' kinds of document (prose, passkey, copying) in the
    corpus's shares, loss on every token, back to back across rows; they are new documents of
    those kinds, not the students' corpus (other keys)."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from kdcache.replicate.corpus import document_mix, write_short_corpus
    from kdcache.replicate.presets import get_preset
    from kdcache.replicate.teacher import DocumentBatches
    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

    build_teacher(str(tmp_path), TeacherConfig(**SMOKE_MODEL), log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    preset = replace(get_preset("smoke"), passkey_share=0.3, copy_share=0.3, corpus_documents=60)
    batches = DocumentBatches(tok, document_mix(preset), row=128, tokens_per_step=1024, seed=0)
    rows = []
    for _ in range(6):
        ids, labels = batches.batch()
        assert ids.shape == (8, 128) and (labels == ids).all()  # every token is a target
        rows += ids.tolist()
    # each row at a random offset of the teacher's context (where the dumps put documents)
    import torch

    positions = batches.positions(1024, torch.Generator().manual_seed(0))
    assert positions.shape == (8, 128)
    assert ((positions[:, 1:] - positions[:, :-1]) == 1).all()
    assert positions.min() >= 0 and positions.max() < 1024 and positions[:, 0].unique().numel() > 1
    assert (batches.positions(128, torch.Generator()) == torch.arange(128)).all()
    stream = [t for row in rows for t in row]
    docs = []  # the documents between BOS and EOS (the first and last may be cut)
    for piece in tok.decode(stream).split("<s>")[1:-1]:
        docs.append(piece.split("</s>")[0].strip())
    keys = {m.group(1) for d in docs for m in [re.search(r"The pass key is (\d+)\.", d)] if m}
    copies = [d for d in docs if len(d.split()) % 2 == 0 and d.split()[:len(d.split()) // 2]
              == d.split()[len(d.split()) // 2:]]
    assert len(keys) >= 3 and len(copies) >= 3 and len(docs) - len(keys) - len(copies) >= 3
    assert all(len(tok(d, add_special_tokens=False)["input_ids"]) + 2 <= preset.doc_max_tokens
               for d in docs)
    write_short_corpus(str(tmp_path / "c.jsonl"), str(tmp_path), preset, seed=0)
    with open(tmp_path / "c.jsonl") as fh:
        corpus = [json.loads(line)["text"] for line in fh]
    corpus_keys = {m.group(1) for d in corpus
                   for m in [re.search(r"The pass key is (\d+)\.", d)] if m}
    assert corpus_keys and not keys & corpus_keys and not set(docs) & set(corpus)


def test_document_steps_train_at_offset_positions(tmp_path):
    """A context too short for copying or passkey prompts trains on documents alone (prose: a
    limit too short for passkey or copying documents leaves them out): the document steps run
    (at offsets within the context) and are in the record."""
    record = train_retrieval_teacher(str(tmp_path / "t"), SMOKE_MODEL, context=16, seconds=60,
                                     tokens_per_step=64, max_steps=3, log=lambda m: None,
                                     documents={"limit": 8, "passkey_share": 0.5,
                                                "copy_share": 0.5})
    assert record["steps"] == 3 and record["final_loss"]["documents"] > 0
    assert record["final_loss"]["copy"] is None and record["passkey"] is None


@pytest.mark.slow
def test_a_tiny_teacher_learns_to_retrieve_the_passkey(tmp_path):
    """The recipe, bounded by steps (not time): greedy passkey accuracy on the evaluation's own
    prompts well above chance (a 5-digit key: ~0) at the trained lengths (measured: 0.96 with one
    copied length; a length per row passes too). The old recipe (passkey prompts from the start,
    labels on the answer only) stays at 0.0 for 900 steps. ~2.5 minutes on 2 cores."""
    from kdcache.replicate.evaluation import needle_record

    out = str(tmp_path / "teacher")
    record = train_retrieval_teacher(out, SMOKE_MODEL, context=256, seconds=3600,
                                     tokens_per_step=2048, lr=1e-3, max_steps=TEST_STEPS,
                                     log=lambda m: None)
    assert record["steps"] == TEST_STEPS
    with open(teacher_record(out)) as fh:
        saved = json.load(fh)
    assert saved["passkey"]["by_length"][str(MIN_PASSKEY)]["samples"] > 0
    assert saved["copy_phase_steps"] > 0 and saved["trajectory"][-1]["step"] <= TEST_STEPS
    needle = needle_record(out, {"tasks": ["passkey"], "lengths": [MIN_PASSKEY, 224],
                                 "depths": [0.2, 0.5, 0.8], "samples": 4, "max_new_tokens": 8,
                                 "engine": "hf", "dtype": "float32", "device": "cpu",
                                 "seed": 0})
    assert needle["accuracy"] >= 0.6, needle["accuracy"]


TEST_STEPS = 1500


def test_a_model_in_other_token_ids_is_refused_before_training(tmp_path):
    """The students' start must share the teachers' tokenizer byte for byte: another tokenizer
    size is refused before any step, and nothing is marked trained."""
    from kdcache.replicate.presets import ReplicateError
    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

    reference = str(tmp_path / "teacher")
    build_teacher(reference, TeacherConfig(**SMOKE_MODEL), log=lambda m: None)
    other = dict(SMOKE_MODEL, tokenizer_vocab=512)
    out = str(tmp_path / "base")
    with pytest.raises(ReplicateError, match="tokenizer differs"):
        train_retrieval_teacher(out, other, context=256, seconds=60, max_steps=1,
                                tokenizer_of=reference, log=lambda m: None)
    assert not os.path.exists(teacher_record(out))


def test_a_tied_start_model_is_what_the_native_student_computes(tmp_path):
    """The students' start is built tied (lm_head = embed_tokens), so the native Student loads
    it and computes the same logits as transformers."""
    import torch
    from transformers import LlamaForCausalLM

    from kdcache.student_train.model import load_hf
    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

    out = str(tmp_path / "base")
    build_teacher(out, TeacherConfig(**SMOKE_MODEL, rope_theta=10_000.0, tie_embeddings=True),
                  log=lambda m: None)
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings
    student = load_hf(out).eval()
    tokens = torch.randint(0, SMOKE_MODEL["vocab_size"], (1, 96))
    with torch.no_grad():
        torch.testing.assert_close(student.logits(student(tokens)), hf(tokens).logits,
                                   atol=1e-4, rtol=1e-4)
