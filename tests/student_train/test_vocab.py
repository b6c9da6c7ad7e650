"""Student vs teacher vocabulary: refused unless the maps agree on every id the teacher emits."""

from __future__ import annotations

import json

import pytest

from kdcache.student_train.vocab_check import (Vocab, VocabMismatchError, check_vocab,
                                               tokenizer_map)


def _map(n: int, swap: tuple[int, int] | None = None) -> dict[str, int]:
    tokens = {f"tok{i}": i for i in range(n)}
    if swap:
        a, b = swap
        tokens[f"tok{a}"], tokens[f"tok{b}"] = b, a
    return tokens


def test_identical_vocabularies_pass():
    verdict = check_vocab(Vocab("student", 100, _map(100)), Vocab("teacher", 100, _map(100)))
    assert "identical" in verdict


def test_padded_lm_head_is_accepted_and_said():
    # 151,936-style: tokenizer entries fewer than lm_head rows, maps equal on every real id
    verdict = check_vocab(Vocab("student", 128, _map(120)), Vocab("teacher", 136, _map(120)))
    assert "padding" in verdict and "128" in verdict and "136" in verdict


def test_different_token_map_is_refused_naming_both():
    with pytest.raises(VocabMismatchError, match=r"teacher T-model .* student S-model"):
        check_vocab(Vocab("S-model", 100, _map(100, swap=(3, 7))), Vocab("T-model", 100, _map(100)))


def test_student_without_rows_for_teacher_ids_is_refused():
    with pytest.raises(VocabMismatchError, match="only 90 lm_head rows"):
        check_vocab(Vocab("s", 90, _map(100)), Vocab("t", 100, _map(100)))


def test_size_mismatch_without_tokenizers_is_refused():
    with pytest.raises(VocabMismatchError, match="student s has 4096 .* teacher t has 256"):
        check_vocab(Vocab("s", 4096), Vocab("t", 256))


def test_tokenizer_json_is_read(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    assert tokenizer_map(str(tmp_path)) == vocab
    json.loads((tmp_path / "tokenizer.json").read_text())


def test_training_refuses_a_mismatched_student_before_it_starts(doc_dataset, tmp_path, tiny_run):
    from kdcache.student_train.stages import parse_run, run

    raw = tiny_run([doc_dataset], tmp_path)
    raw["defaults"]["model"]["vocab_size"] = 4096  # the tiny preset's own size; teacher has 256
    with pytest.raises(VocabMismatchError, match="4096"):
        run(parse_run(raw))
    assert not (tmp_path / "s1" / "checkpoints").exists()


def test_student_on_the_dataset_vocabulary_inherits_the_teacher_tokenizer(doc_dataset, tmp_path,
                                                                            tiny_run):
    """A student sized from the dataset uses the teacher's token map (checked id by id) and its
    HF export carries the tokenizer, so transformers, vLLM and `eval needle` can load it."""
    import json
    import shutil

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from kdcache.student_train.stages import parse_run, run
    from tests.student_train.conftest import VOCAB

    data = tmp_path / "ds"
    shutil.copytree(doc_dataset, data)
    # The teacher's directory inside the dataset: a manifest's paths are followed only there.
    teacher = data / "teacher"
    teacher.mkdir()
    Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")).save(
        str(teacher / "tokenizer.json"))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["teacher"]["path"] = "teacher"
    (data / "manifest.json").write_text(json.dumps(manifest))
    summary = run(parse_run(tiny_run([str(data)], tmp_path / "run", steps=1)))[0]
    assert "vocabularies identical" in summary["vocab"]
    exported = Tokenizer.from_file(str(tmp_path / "run" / "s1" / "hf" / "tokenizer.json"))
    assert exported.get_vocab() == {f"t{i}": i for i in range(VOCAB)}
