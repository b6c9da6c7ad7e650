"""Chat corpora: conversations rendered with the teacher's own template, target masks checked
token by token against the rendered text, bad conversations counted, response-only dumps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdcache.teacher_dump.chat import (ChatError, ChatRenderer, Conversation,
                                       conversation_from_record)
from kdcache.teacher_dump.corpus import CorpusSpec, CorpusStats, iter_documents
from kdcache.teacher_dump.pack import (PackConfig, PackingError, PackStats, TeacherTokenizer,
                                       pack_documents)

TOOL_CHAT = {
    "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the code of alice?"},
        {"role": "assistant", "content": "The code of alice is 412."},
        {"role": "user", "content": "And bob?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "lookup", "arguments": {"name": "bob"}}}]},
        {"role": "tool", "content": "733"},
        {"role": "assistant", "content": "The code of bob is 733."},
    ]}
# What the built-in template renders for each assistant turn above, end-of-turn included.
ASSISTANT_TEXTS = ["The code of alice is 412.</s>\n",
                   '<call>{"name": "lookup", "arguments": {"name": "bob"}}</call></s>\n',
                   "The code of bob is 733.</s>\n"]

GENERATION_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}</s>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}</s>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Renders the final turn differently from the same turn mid-conversation.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}{% if loop.last %}[final]{% endif %}<|{{ m['role'] }}|>\n"
    "{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('system messages are not supported') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}")


@pytest.fixture(scope="module")
def tok(teacher_dir):
    return TeacherTokenizer(teacher_dir)


def _masked_runs(tok, ids, mask) -> list[str]:
    """The decoded text of each maximal run of target tokens."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(tok.tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.tok.decode(cur))
    return runs


def test_assistant_mask_matches_rendered_turns_token_by_token(tok):
    conv = conversation_from_record(TOOL_CHAT)
    out = ChatRenderer(tok.tok, tok.bos_id, "assistant").render(conv)
    assert len(out.ids) == len(out.target_mask)
    assert _masked_runs(tok, out.ids, out.target_mask) == ASSISTANT_TEXTS
    # every token outside the runs is prompt: decoding the whole thing gives the rendered text
    assert tok.tok.decode(out.ids) == out.text
    last = ChatRenderer(tok.tok, tok.bos_id, "last-assistant").render(conv)
    assert last.ids == out.ids
    assert _masked_runs(tok, last.ids, last.target_mask) == ASSISTANT_TEXTS[-1:]
    everything = ChatRenderer(tok.tok, tok.bos_id, "all").render(conv)
    assert everything.target_mask.all() and everything.ids == out.ids


def test_generation_tags_are_used_where_the_template_has_them(tok):
    conv = conversation_from_record({"messages": TOOL_CHAT["messages"][:4]
                                     + [{"role": "assistant", "content": "Bob is 733."}]})
    tok.tok.chat_template = GENERATION_TEMPLATE
    try:
        tagged = ChatRenderer(tok.tok, tok.bos_id, "assistant")
        assert tagged.has_generation_tags
        out = tagged.render(conv)
        assert _masked_runs(tok, out.ids, out.target_mask) == [
            "The code of alice is 412.</s>\n", "Bob is 733.</s>\n"]
        # the prefix-by-prefix rule gives the same mask on the same template
        prefix = ChatRenderer(tok.tok, tok.bos_id, "last-assistant").render(conv)
        assert _masked_runs(tok, prefix.ids, prefix.target_mask) == ["Bob is 733.</s>\n"]
    finally:
        tok.tok.chat_template = tok.tok.init_kwargs.get("chat_template") or _builtin()


def _builtin():
    from kdcache.teacher_dump.chat import BUILTIN_CHAT_TEMPLATE
    return BUILTIN_CHAT_TEMPLATE


def test_templates_that_cannot_be_split_or_reject_are_refused(tok):
    conv = conversation_from_record(TOOL_CHAT)
    saved = tok.tok.chat_template
    try:
        tok.tok.chat_template = UNSTABLE_TEMPLATE
        with pytest.raises(ChatError, match="prefix by prefix"):
            ChatRenderer(tok.tok, tok.bos_id, "assistant").render(conv)
        # the whole-conversation policy needs no split
        assert ChatRenderer(tok.tok, tok.bos_id, "all").render(conv).target_mask.all()
        tok.tok.chat_template = NO_SYSTEM_TEMPLATE
        with pytest.raises(ChatError, match="system messages are not supported"):
            ChatRenderer(tok.tok, tok.bos_id, "assistant").render(conv)
    finally:
        tok.tok.chat_template = saved


@pytest.mark.parametrize("record, message", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role 'wizard'"),
    ({"messages": [{"role": "user"}]}, "has no content"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be"),
    ({"prompt": 5}, "'prompt' must be"),
    ({"prompt": "hi", "response": ["x"]}, "'response' must be"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": "all"}, "'tools' must be"),
])
def test_malformed_conversations_name_the_problem(record, message):
    with pytest.raises(ChatError, match=message):
        conversation_from_record(record)


def test_prompt_response_records_become_conversations():
    conv = conversation_from_record({"prompt": "Say hi.", "response": "Hi."})
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    conv = conversation_from_record({"prompt": [{"role": "system", "content": "s"},
                                                {"role": "user", "content": "u"}],
                                     "completion": "c"})
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]


def test_chat_corpora_in_jsonl_and_parquet_are_read_and_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [json.dumps(TOOL_CHAT), json.dumps({"prompt": "a", "response": "b"}),
             json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
             json.dumps({"text": "plain text still works"}), "not json"]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    stats = CorpusStats()
    docs = list(iter_documents(CorpusSpec(str(tmp_path / "c.jsonl")), stats))
    assert [type(d).__name__ for _, d in docs] == ["Conversation", "Conversation", "str"]
    assert (stats.chats, stats.bad_chat, stats.undecodable, stats.documents) == (2, 1, 1, 3)
    assert any("role 'wizard'" in p for p in stats.problems)

    table = pa.table({"messages": [[{"role": "user", "content": "u"},
                                    {"role": "assistant", "content": "a"}]],
                      "id": [7]})
    pq.write_table(table, tmp_path / "c.parquet")
    stats = CorpusStats()
    docs = list(iter_documents(CorpusSpec(str(tmp_path / "c.parquet")), stats))
    assert len(docs) == 1 and isinstance(docs[0][1], Conversation) and stats.chats == 1


def test_packing_carries_masks_and_counts_rejected_and_long_conversations(tok, tmp_path):
    long_chat = {"messages": [{"role": "user", "content": "word " * 400},
                              {"role": "assistant", "content": "ok"}]}
    no_assistant = {"messages": [{"role": "user", "content": "hello"}]}
    docs = [(0, conversation_from_record(TOOL_CHAT)), (1, conversation_from_record(long_chat)),
            (2, conversation_from_record(no_assistant)), (3, "a plain text document")]
    stats = PackStats()
    wins = list(pack_documents(iter(docs), tok, PackConfig(window=256, targets="auto"), stats))
    assert (stats.chats, stats.dropped_long_chats, stats.rejected_chats) == (1, 1, 1)
    assert any("no assistant turn" in p for p in stats.problems)
    assert stats.documents == 2  # the tool conversation and the plain text (all its tokens)
    mask = np.concatenate([np.ones(w.n_tokens, bool) if w.target_mask is None else w.target_mask
                           for w in wins])
    tokens = np.concatenate([w.tokens for w in wins])
    assert mask.sum() == stats.target_tokens
    # the plain-text document keeps every token a target (BOS included), the chat only its turns
    plain = [w for w in wins if 3 in w.doc_ids.tolist()][0]
    s, e = [(plain.doc_offsets[i], plain.doc_offsets[i + 1])
            for i, d in enumerate(plain.doc_ids.tolist()) if d == 3][0]
    assert plain.target_mask is None or plain.target_mask[s:e].all()
    assert tokens.shape == mask.shape


def test_a_teacher_without_a_chat_template_is_refused_once(tmp_path, teacher_dir):
    import shutil

    d = tmp_path / "t"
    shutil.copytree(teacher_dir, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = TeacherTokenizer(str(d))
    with pytest.raises(PackingError, match="no chat template"):
        list(pack_documents(iter([(0, conversation_from_record(TOOL_CHAT))]), tok,
                            PackConfig(window=256), PackStats()))


@pytest.fixture(scope="module")
def chat_dumps(tmp_path_factory, teacher_dir, hf_workers, small_dump_config, read_all):
    """The built-in chat corpus dumped twice, response-only and all tokens (same windows)."""
    from kdcache.formats.verify import verify_dataset
    from kdcache.teacher_dump.runner import run_dump

    root = tmp_path_factory.mktemp("chat-dumps")
    runs = {}
    for targets in ("assistant", "all"):
        out = root / targets
        cfg = small_dump_config(teacher_dir, out, corpus="builtin-chat", builtin_documents=16,
                                targets=targets, window=512)
        summary = run_dump(cfg, actors=hf_workers)
        assert verify_dataset(str(out)).ok
        runs[targets] = (str(out), summary, *read_all(str(out)))
    return runs


@pytest.mark.slow
def test_response_only_dump_stores_targets_exactly_on_assistant_rows(chat_dumps, teacher_dir):
    """Same teacher, same windows: the response-only dataset's targets are the all-token
    dataset's rows where the next token is an assistant token, and nothing else is stored."""
    from kdcache.teacher_dump.engines.base import needed_rows
    from kdcache.teacher_dump.pack import PackedWindow
    from kdcache.teacher_dump.runner import format_summary

    runs = {k: v[1:] for k, v in chat_dumps.items()}
    summary, manifest, windows = runs["assistant"]
    _, manifest_all, windows_all = runs["all"]
    assert manifest["packing"]["targets"] == "assistant"
    assert manifest_all["packing"]["targets"] == "all"
    assert "16 conversations packed" in format_summary(summary)
    tok = TeacherTokenizer(teacher_dir)
    from kdcache.teacher_dump.corpus import builtin_chat_corpus
    from kdcache.teacher_dump.pack import pack_documents as pack

    expected = list(pack(enumerate(builtin_chat_corpus(16, 0)), tok,
                         PackConfig(window=512, targets="assistant"), PackStats()))
    n_valid = 0
    for (idx, tokens, offsets, valid, ids, lps), (_, tokens_a, _, valid_a, ids_a, lps_a), win in \
            zip(windows, windows_all, expected):
        np.testing.assert_array_equal(tokens, win.tokens)
        np.testing.assert_array_equal(valid, needed_rows(win, "document"))
        assert not np.any(valid & ~valid_a)
        np.testing.assert_array_equal(ids[valid], ids_a[valid])
        np.testing.assert_allclose(lps[valid], lps_a[valid], atol=1e-5)
        # every valid row predicts an assistant token
        assert win.target_mask[1:][valid[:-1]].all()
        n_valid += int(valid.sum())
        assert isinstance(win, PackedWindow)
    assert 0 < n_valid < sum(int(w[3].sum()) for w in windows_all)
    bytes_resp = sum(s["bytes"] for s in manifest["shards"])
    bytes_all = sum(s["bytes"] for s in manifest_all["shards"])
    assert bytes_resp < bytes_all


@pytest.mark.slow
def test_a_student_trains_on_the_assistant_rows_only(chat_dumps, tmp_path):
    """The built-in student trains on a response-only dataset unchanged: its KD and CE rows are
    exactly the dataset's valid rows (prompt tokens carry IGNORE labels), and it exports."""
    from kdcache.formats.reader import open_dataset
    from kdcache.student_train.data import IGNORE_INDEX, window_to_sample
    from kdcache.student_train.stages import parse_run, run

    path = chat_dumps["assistant"][0]
    ds = open_dataset(path)
    for i in range(len(ds)):
        w = ds[i]
        sample = window_to_sample(w, "topk")
        np.testing.assert_array_equal(sample.labels != IGNORE_INDEX, w.valid.numpy())
    raw = {"name": "chat", "output_dir": str(tmp_path / "run"), "defaults": {
        "model": {"preset": "tiny", "vocab_size": "dataset", "overrides": {"n_layer": 1}},
        "data": {"paths": [path], "seed": 0}, "loss": {"alpha": 0.5},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "total_steps": 3},
        "trainer": {"max_steps": 3, "checkpoint_every": 3, "progress_bar": False,
                    "log_every_n_steps": 1, "accelerator": "cpu"}},
        "stages": [{"name": "s1"}]}
    run(parse_run(raw))
    assert (tmp_path / "run" / "s1" / "hf" / "config.json").exists()
