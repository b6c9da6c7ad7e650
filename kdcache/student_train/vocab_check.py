"""Student vocabulary against the dataset's teacher vocabulary, checked before training.

The student learns a distribution over the teacher's ids, so both must mean the same token by the
same id. Two vocabularies are accepted when
- the lm_head sizes are equal and the tokenizers (when both are known) map every id identically; or
- the sizes differ only by padding rows (a 151,936-entry tokenizer under a 152,064-row lm_head):
  the token -> id maps agree on every id the teacher can emit (its tokenizer's ids) and the
  student has a row for each of them. This is logged.
Anything else is refused with a message naming both sides; ids are never truncated or padded
silently (the data module also refuses, per window, any target id the student has no row for).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from kdcache.errors import ConfigMismatchError

log = logging.getLogger("kdcache.train")


class VocabMismatchError(ConfigMismatchError):
    """The student's vocabulary differs from the dataset teacher's."""


@dataclass
class Vocab:
    """One side: lm_head rows, and the tokenizer's token -> id map when known."""

    name: str
    rows: int
    token_to_id: dict[str, int] | None = None
    tokenizer_hash: str | None = None


def tokenizer_map(path: str) -> dict[str, int]:
    """token -> id of an HF tokenizer directory (tokenizer.json, via the `tokenizers` library)."""
    from tokenizers import Tokenizer

    file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise ConfigMismatchError(f"{path}: no tokenizer.json to compare vocabularies with")
    return Tokenizer.from_file(file).get_vocab(with_added_tokens=True)


def check_vocab(student: Vocab, teacher: Vocab) -> str:
    """Return a one-line verdict for the log, or raise VocabMismatchError naming both."""
    both_maps = student.token_to_id is not None and teacher.token_to_id is not None
    if both_maps:
        emit = teacher.token_to_id
        by_id_student = {i: t for t, i in student.token_to_id.items()}
        diff = [(t, i, by_id_student.get(i)) for t, i in emit.items() if by_id_student.get(i) != t]
        if diff:
            token, tid, other = sorted(diff, key=lambda x: x[1])[0]
            raise VocabMismatchError(
                f"vocabulary mismatch: teacher {teacher.name} maps {token!r} to id {tid}, student "
                f"{student.name} has {other!r} there ({len(diff)} ids differ); a student must "
                "use the teacher's token -> id map")
        highest = max(emit.values(), default=-1)
        if highest >= student.rows:
            raise VocabMismatchError(
                f"vocabulary mismatch: teacher {teacher.name} can emit id {highest}, student "
                f"{student.name} has only {student.rows} lm_head rows")
        if student.rows != teacher.rows:
            return (f"vocabularies agree on all {len(emit)} teacher token ids; lm_head rows "
                    f"differ by padding (student {student.name}: {student.rows}, teacher "
                    f"{teacher.name}: {teacher.rows}); accepted")
        return f"vocabularies identical ({student.rows} rows, {len(emit)} tokens)"
    if student.rows != teacher.rows:
        raise VocabMismatchError(
            f"vocabulary size mismatch: student {student.name} has {student.rows} lm_head rows, "
            f"teacher {teacher.name} has {teacher.rows}; give the student the teacher's size, or "
            "both tokenizers (model.tokenizer and the dataset's teacher path) so that a padded "
            "vocabulary can be checked id by id")
    if (student.tokenizer_hash and teacher.tokenizer_hash
            and student.tokenizer_hash != teacher.tokenizer_hash):
        raise VocabMismatchError(
            f"tokenizer mismatch: student {student.name} tokenizer hash {student.tokenizer_hash}, "
            f"teacher {teacher.name} tokenizer hash {teacher.tokenizer_hash}")
    return f"vocabulary sizes equal ({student.rows}); token maps not compared (tokenizer unknown)"


def teacher_vocab(header, where: str) -> Vocab:
    """The teacher side from a dataset header (its tokenizer read from teacher.path if local)."""
    teacher = header.teacher or {}
    name = f"{teacher.get('name') or teacher.get('path') or 'teacher'} (dataset {where})"
    token_map = None
    path = teacher.get("tokenizer_path") or teacher.get("path")
    if path and os.path.exists(os.path.join(str(path), "tokenizer.json")):
        token_map = tokenizer_map(str(path))
    return Vocab(name, header.vocab_size, token_map, teacher.get("tokenizer_hash"))


def student_vocab(rows: int, tokenizer: str | None, name: str = "student") -> Vocab:
    token_map = tokenizer_map(tokenizer) if tokenizer else None
    return Vocab(f"{name} ({tokenizer})" if tokenizer else name, rows, token_map)
