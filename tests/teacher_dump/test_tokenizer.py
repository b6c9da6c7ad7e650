"""The dump tokenizes with the tokenizer.json whose hash it records, whatever class
tokenizer_config.json names (transformers 5's AutoTokenizer rebuilds some classes' pipelines)."""

from __future__ import annotations

import json

import pytest

from kdcache.teacher_dump.pack import TeacherTokenizer, tokenizer_files, tokenizer_hash

TEXTS = ["Hello  world, the code of alice is 123.\n  Indented line", " leading space"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

    out = tmp_path_factory.mktemp("tok") / "teacher"
    build_teacher(str(out), TeacherConfig.preset("tiny"), log=lambda m: None)
    return out


@pytest.mark.parametrize("tokenizer_class", ["LlamaTokenizer", "Qwen2Tokenizer"])
def test_tokens_come_from_tokenizer_json_whatever_class_is_named(tokenizer_dir, tokenizer_class):
    from tokenizers import Tokenizer

    config_path = tokenizer_dir / "tokenizer_config.json"
    original = config_path.read_text()
    try:
        config_path.write_text(json.dumps({**json.loads(original),
                                           "tokenizer_class": tokenizer_class}))
        tok = TeacherTokenizer(str(tokenizer_dir))
        raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        assert tok.encode_batch(TEXTS) == [e.ids for e in raw.encode_batch(
            TEXTS, add_special_tokens=False)]
        assert (tok.bos_id, tok.eos_id) == (raw.token_to_id("<s>"), raw.token_to_id("</s>"))
    finally:
        config_path.write_text(original)


def test_the_hash_covers_what_is_loaded_and_only_that(tokenizer_dir):
    assert "tokenizer.json" in tokenizer_files(str(tokenizer_dir))
    before = tokenizer_hash(str(tokenizer_dir))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\na b\n")  # not read beside .json
    assert tokenizer_hash(str(tokenizer_dir)) == before
    (tokenizer_dir / "merges.txt").unlink()
    config_path = tokenizer_dir / "tokenizer_config.json"
    original = config_path.read_text()
    try:
        config_path.write_text(json.dumps({**json.loads(original), "eos_token": "<s>"}))
        assert tokenizer_hash(str(tokenizer_dir)) != before  # the special tokens are used
    finally:
        config_path.write_text(original)
