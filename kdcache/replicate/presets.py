"""Sizes of the replication experiment: `smoke` (the whole pipeline on 2 CPU cores in minutes, run
by the tests) and `toy` (a teacher that can retrieve at 16k, sized for one H200 in under 20
minutes: two 450 s teachers and the students' 300 s start beside them, then dumps, 27 students
14 at a time, evaluation; H200 2026-12-02, fifth run: 16.5 minutes end to end,
docs/replication.md).

Every arm of a preset trains on the same data for the same steps; only what the arm names differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from kdcache.errors import KdcacheError


class ReplicateError(KdcacheError):
    """The experiment cannot run as asked."""

# Student arms. Each is (loss, theta schedule, targets): the main grid is KD/CE x three theta
# schedules on document-masked, global-position targets; the causal-test arms keep KD and the
# phase-wise schedule and change only where the targets come from.
THETAS = {"phasewise": (10_000.0, 500_000.0), "fixed10k": (10_000.0, 10_000.0),
          "fixed500k": (500_000.0, 500_000.0)}
MAIN_ARMS = tuple(f"{loss}-{theta}" for loss in ("kd", "ce") for theta in THETAS)
CAUSAL_ARMS = {
    # (a) targets computed with positions restarted in every document, student at global positions
    "kd-phasewise-docpos": "targets from `document` mode (positions restart per document)",
    # (b) a teacher that never saw a context longer than the short window
    "kd-phasewise-shortteacher": "targets from a teacher trained on short contexts only",
    # (c) attention across documents
    "kd-phasewise-causal": "targets from `causal` packing (attention crosses documents)",
}


@dataclass(frozen=True)
class Preset:
    name: str
    teacher_model: dict[str, Any]  # TeacherConfig fields (head_dim 64)
    teacher_seconds: float  # training time of each teacher
    teacher_context: int  # longest retrieval sequence the long teacher trains on
    teacher_tokens_per_step: int  # tokens in each teacher step (rows x length)
    teacher_lr: float  # teacher AdamW rate after warmup (teacher.py: the recipe)
    short_context: int  # longest context of the short-context teacher (arm b)
    doc_max_tokens: int  # student documents are at most this long
    corpus_documents: int
    # Shares of the corpus's documents that are retrieval documents (corpus.py): passkey prompts
    # with their answer, and copying (random words and numbers, then the same again). Built-in
    # prose alone teaches a student from random weights no retrieval at all, so without these no
    # distance can be tested.
    passkey_share: float
    copy_share: float
    short_window: int  # stage 1 window (theta 10k in the phase-wise schedule)
    long_window: int  # stage 2 window: many short documents, document mask, global positions
    student_preset: str
    student_overrides: dict[str, Any]
    stage1_steps: int
    stage2_steps: int
    seeds: int
    k: int
    needle_lengths: tuple[int, ...]  # up to and past the training window
    needle_depths: tuple[float, ...]
    needle_samples: int  # per (length, depth, model)
    probe_block: int
    probe_repeats: int
    arms: tuple[str, ...] = MAIN_ARMS + ("kd-phasewise-docpos", "kd-phasewise-shortteacher")
    device: str = "cpu"
    dtype: str = "float32"
    batch_windows: int = 1
    lr: float = 3e-3
    parallel: int = 1  # independent steps at once, each its own process (tasks.py)
    # The students' start (TeacherConfig fields, tied embeddings, the student preset's shape):
    # trained with the teachers' retrieval curriculum at context = short_window for
    # `student_base_seconds`, beside the teachers, and loaded by every arm's stage 1, as the
    # paper's students start from a pretrained short-context model. None: random init (a
    # student trained from random weights on the corpus alone learns no retrieval at all).
    student_base: dict[str, Any] | None = None
    student_base_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_device(self) -> str:
        """"cuda" or "cpu": where the preset's models run."""
        return "cuda" if self.device.startswith("cuda") else "cpu"


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        teacher_model=dict(vocab_size=1024, tokenizer_vocab=1024, hidden_size=128,
                           intermediate_size=384, num_layers=2, num_heads=2, num_kv_heads=1,
                           max_positions=4096),
        teacher_seconds=20.0, teacher_context=512, teacher_tokens_per_step=2048,
        # documents up to 176 tokens: the smoke tokenizer's shortest passkey prompt is ~153
        teacher_lr=1e-3, short_context=128, doc_max_tokens=176,
        corpus_documents=240, passkey_share=0.1, copy_share=0.1, short_window=256,
        long_window=512, student_preset="tiny",
        student_overrides={"n_layer": 1}, stage1_steps=12, stage2_steps=12, seeds=1, k=8,
        needle_lengths=(256, 512, 768), needle_depths=(0.2, 0.8), needle_samples=2,
        probe_block=64, probe_repeats=4,
        student_base=dict(vocab_size=1024, tokenizer_vocab=1024, hidden_size=128,
                          intermediate_size=256, num_layers=1, num_heads=2, num_kv_heads=1,
                          max_positions=4096, rope_theta=10_000.0, tie_embeddings=True),
        student_base_seconds=10.0),
    "toy": Preset(
        name="toy",
        teacher_model=dict(vocab_size=2048, tokenizer_vocab=2048, hidden_size=512,
                           intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4,
                           max_positions=65536),
        # A 27M-parameter model is launch-bound on an H200 (8k-token steps: ~23 steps/s, most
        # of the GPU idle), so a step of 64k tokens costs little more time than one of 8k and
        # holds 8x the passkey samples (256-372 rows at the first rungs, 4 at 16k).
        # Each teacher, two at once on one H200 (H200 2026-12-02, docs/replication.md): the
        # copying phase ended at step 206, the long teacher's 16k rung opened at step 420 (85 s)
        # and 1,960 steps in 450 s reached 0.96 running accuracy there (needle 0.62 at
        # distances >= 2k); the short one 2,355 steps. Both get the same time: the same recipe
        # and tokens per step.
        teacher_seconds=450.0, teacher_context=16384, teacher_tokens_per_step=65536,
        teacher_lr=1e-3, short_context=2048, doc_max_tokens=2048,
        # 19,000 documents: ~6.3M tokens (prose ~157 tokens a document, passkey ~1,090, copy
        # ~960 with the toy tokenizer), the dumps' size before retrieval documents were added
        corpus_documents=19_000, passkey_share=0.1, copy_share=0.1, short_window=2048,
        long_window=16384, student_preset="tiny-4l",
        student_overrides={}, stage1_steps=300, stage2_steps=150, seeds=3, k=32,
        needle_lengths=(1024, 2048, 4096, 8192, 16384, 24576), needle_depths=(0.1, 0.5, 0.9),
        needle_samples=8, probe_block=2048, probe_repeats=8,
        arms=MAIN_ARMS + tuple(CAUSAL_ARMS), device="cuda", dtype="bfloat16",
        # 14 at once: each student 162-167 s against 143-147 s nine at a time (the GPU had room)
        batch_windows=2, lr=2e-3, parallel=14,
        # tiny-4l's shape, beside the two teachers (done 150 s before them: less contention)
        student_base=dict(vocab_size=2048, tokenizer_vocab=2048, hidden_size=256,
                          intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2,
                          max_positions=65536, rope_theta=10_000.0, tie_embeddings=True),
        student_base_seconds=300.0),
}


def get_preset(name: str, **overrides: Any) -> Preset:
    if name not in PRESETS:
        raise KdcacheError(f"unknown replicate preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    unknown = [k for k in overrides if k not in preset.__dataclass_fields__]
    if unknown:
        raise KdcacheError(f"unknown preset fields {unknown}")
    preset = replace(preset, **overrides)
    for arm in preset.arms:
        if arm not in MAIN_ARMS and arm not in CAUSAL_ARMS:
            raise KdcacheError(f"unknown arm {arm!r}; arms: {', '.join(MAIN_ARMS + tuple(CAUSAL_ARMS))}")
    if not preset.doc_max_tokens <= preset.short_window < preset.long_window:
        raise KdcacheError("documents must fit the short window, which must be shorter than the "
                           f"long one (got {preset.doc_max_tokens}, {preset.short_window}, "
                           f"{preset.long_window})")
    if not (0 <= preset.passkey_share and 0 <= preset.copy_share
            and preset.passkey_share + preset.copy_share <= 1):
        raise KdcacheError("passkey_share and copy_share must be >= 0 and sum to at most 1 (got "
                           f"{preset.passkey_share}, {preset.copy_share})")
    if preset.student_base is not None:
        check_student_base(preset)
    if preset.seeds < 1:
        raise KdcacheError("seeds must be >= 1")
    if preset.parallel < 1:
        raise KdcacheError("parallel must be >= 1")
    return preset


def check_student_base(preset: Preset) -> None:
    """Refuse a student base the students could not start from exactly: a shape other than the
    student preset's, another vocabulary or tokenizer size than the teachers', untied weights."""
    from kdcache.student_train.model import PRESETS as MODEL_PRESETS

    base = preset.student_base or {}
    if preset.student_preset not in MODEL_PRESETS:
        raise KdcacheError(f"unknown student preset {preset.student_preset!r}")
    student = {**MODEL_PRESETS[preset.student_preset], **preset.student_overrides}
    pairs = {"num_layers": "n_layer", "num_heads": "n_head", "num_kv_heads": "n_kv_head",
             "hidden_size": "dim", "intermediate_size": "ffn_dim"}
    wrong = {b: (base.get(b), student.get(s)) for b, s in pairs.items()
             if base.get(b) != student.get(s)}
    for key in ("vocab_size", "tokenizer_vocab"):
        if base.get(key) != preset.teacher_model.get(key):
            wrong[key] = (base.get(key), preset.teacher_model.get(key))
    if wrong:
        raise KdcacheError("student_base must have the student's shape and the teachers' "
                           "vocabulary; (base, wanted): "
                           + ", ".join(f"{k} {v}" for k, v in wrong.items()))
    if not base.get("tie_embeddings"):
        raise KdcacheError("student_base needs tie_embeddings: true (the student's layout)")
    if preset.student_base_seconds <= 0:
        raise KdcacheError("student_base_seconds must be > 0")


def arm_parts(arm: str) -> tuple[str, str, str]:
    """(loss, theta schedule, target source) of an arm."""
    parts = arm.split("-")
    source = parts[2] if len(parts) > 2 else "main"
    return parts[0], parts[1], source
