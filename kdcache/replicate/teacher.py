"""A teacher that can retrieve at distance: the local Llama teacher, trained on the students' kinds
of document plus passkey retrieval sequences up to its context length.

Nothing can transfer from a teacher that cannot retrieve, so the experiment trains its own and
measures it first. Passkey retrieval is a copy: attend from the question's "The pass key is" to
the token after the needle's "The pass key is", then copy the key token by token (an induction
head). Trained from scratch on passkey prompts alone, small models sit on a plateau (they learn
the answer's format, not the copy: labels on a few answer tokens per long sequence are too
little signal to find the mechanism). So the recipe is a curriculum:

1. dense copying (random tokens, then the same tokens again, loss on the repeat) until the copy
   loss is under `COPY_DONE` (at most `COPY_STEPS` steps): every label is an induction target.
   The copied length is drawn per row: with one length for all rows the model learns to copy
   from a fixed offset back (a positional head; H200: copy loss 0.001 after 150 steps, back to
   uniform as soon as passkey and text steps began, and ~580 steps of plateau before the first
   rung opened), not the content match that passkey retrieval needs;
2. then each step is passkey prompts (`PASSKEY_SHARE`; needle_tasks, the evaluation's own
   prompts, fresh keys and random depths, then the answer and EOS; loss on the needle, whose
   second copy of the key is a short-distance retrieval, and on the answer; prompt lengths
   drawn between half the row and the row), the students' kinds of document with loss on
   every token, each row at a random position offset within `context` as the dumps place
   documents (`DOCUMENT_SHARE`, DocumentBatches: the students distil the teacher's
   distribution on those documents, so it must be right about them) or copying again;
3. passkey lengths climb a ladder, MIN_PASSKEY then powers of two up to `context`: the next rung
   opens once answers at the longest open rung are right (`PROMOTE` exact-answer accuracy, read
   off the training batches' own logits, which are fresh keys every step); half the passkey
   steps train the longest open rung, half revisit a random open one;
4. every step has about `tokens_per_step` tokens of equal-length rows (more rows at shorter
   rungs: more samples for the same compute), AdamW with linear warmup then a constant rate.

The record keeps the ladder and a loss trajectory (each kind's mean loss every `TRACE_EVERY`
steps): where the curriculum stalls, read off one GPU run.

The short-context teacher of the causal test is the same recipe (same seed: same tokenizer,
same initial weights) with `context` = the short window, so the two teachers differ only in the
longest context they were trained on (below MIN_PASSKEY it gets no passkey prompts).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import replace
from typing import Callable

from kdcache.evaluate.needle_tasks import Haystack, build_sample, shortest_passkey
from kdcache.replicate.presets import ReplicateError
from kdcache.replicate.store import save_json
from kdcache.teacher_dump.corpus import builtin_corpus
from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher
from kdcache.teacher_dump.pack import tokenizer_hash

MIN_PASSKEY = 176  # a passkey prompt's instruction, needle and question take ~150 tokens
COPY_DONE = 0.5  # copy loss (running mean) that ends the copying phase: induction is there
COPY_STEPS = 1000  # the copying phase's longest (no induction by then: go on without it)
COPY_LENS = (8, 64)  # tokens copied per row, drawn per row (rows of 2 * 64 + 1 tokens)
# of the steps after the copy phase: passkey prompts, the students' kinds of document; the rest
# copies
PASSKEY_SHARE, DOCUMENT_SHARE = 0.6, 0.3
PROMOTE = 0.8  # exact-answer accuracy at the longest open rung that opens the next one
WARMUP_STEPS = 30
TRACE_EVERY = 25  # steps per point of the record's loss trajectory


def passkey_lengths(context: int) -> list[int]:
    """The ladder of passkey training lengths: MIN_PASSKEY, then the powers of two above it up
    to `context` (and `context` itself); none when the context is shorter than MIN_PASSKEY
    (such a teacher learns from text and copying alone)."""
    if context < MIN_PASSKEY:
        return []
    rungs = {MIN_PASSKEY, context}
    rungs.update(1 << b for b in range(8, context.bit_length()) if 1 << b < context)
    return sorted(rungs)


class PasskeyBatches:
    """Batches [B, L] of passkey prompt + answer + EOS with labels on the needle and the answer,
    and a mask of the answer tokens (to score retrieval from the step's own logits)."""

    def __init__(self, tokenizer, tokens_per_step: int, seed: int) -> None:
        self.tok, self.tokens = tokenizer, tokens_per_step
        self.haystack = Haystack(tokenizer)
        self.rng = random.Random(seed)
        self.shortest = shortest_passkey(tokenizer)

    def batch(self, length: int):
        import torch

        eos = self.tok.eos_token_id
        rows, labels, answers = [], [], []
        for _ in range(max(1, self.tokens // length)):
            # Prompt lengths vary within the row length: with one prompt length per rung the
            # question and the needle sit at a few fixed positions, and a small model learns
            # those positions instead of finding the needle by its content.
            size = self.rng.randint(min(length - 8, max(self.shortest, length // 2)), length - 8)
            sample = build_sample(self.tok, self.haystack, "passkey", "numbers", size,
                                  self.rng.random(), self.rng)
            answer = list(self.tok(" " + sample.answers[0] + ".",
                                   add_special_tokens=False)["input_ids"]) + [eos]
            prompt = list(sample.input_ids)
            ids = (prompt + answer + [eos] * length)[:length]
            target = [-100] * length
            start, end = sample.needle_spans[0]
            target[start:end] = ids[start:end]
            target[len(prompt):len(prompt) + len(answer)] = answer
            mask = [0] * length
            mask[len(prompt):len(prompt) + len(answer)] = [1] * len(answer)
            rows.append(ids)
            labels.append(target[:length])
            answers.append(mask[:length])
        return (torch.tensor(rows, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                torch.tensor(answers, dtype=torch.bool))


def _copy_batch(vocab: int, tokens: int, context: int, generator):
    """Rows of BOS, n random tokens, the same n again, random filler; labels on the repeat
    after its first token. n is drawn per row: with one n for all rows the model copies from a
    fixed offset back (a positional head, measured: loss ~14 on any other n), which passkey
    retrieval cannot use; with n unknown the repeat is found by its content (an induction
    head: the previous occurrence of the current token, then the token after it)."""
    import torch

    length = min(2 * COPY_LENS[1] + 1, context)
    rows = max(1, tokens // length)
    n = torch.randint(COPY_LENS[0], (length - 1) // 2 + 1, (rows, 1), generator=generator)
    ids = torch.randint(3, vocab, (rows, length), generator=generator)
    ids[:, 0] = 1  # BOS
    pos = torch.arange(length).expand(rows, length)
    repeat = (pos >= 1 + n) & (pos < 1 + 2 * n)
    ids = torch.gather(ids, 1, torch.where(repeat, pos - n, pos))
    # the repeat's first token cannot be foreseen (n is unknown); the rest can, by content
    labels = torch.where(repeat & (pos > 1 + n), ids, torch.full_like(ids, -100))
    return ids, labels


class DocumentBatches:
    """Rows of the students' kinds of document (corpus.DocumentSource: prose, passkey and
    copying documents in the corpus's shares, fresh ones from the teacher's own seed, never the
    corpus's documents), BOS + document + EOS back to back, loss on every token. A teacher
    trained on passkey prompts with loss on the needle and the answer alone, and on copying
    with loss on the repeat alone, never learns what the haystack or the unrepeated half looks
    like: it predicts them confidently wrong (toy, H200: held-out perplexity 8,260 on the
    students' documents, CE students 2.46), and KD students distil that."""

    def __init__(self, tokenizer, mix: dict, row: int, tokens_per_step: int, seed: int) -> None:
        from kdcache.replicate.corpus import DocumentSource

        self.tok, self.limit, self.row = tokenizer, mix["limit"], row
        self.rows = max(1, tokens_per_step // row)
        self.source = DocumentSource(tokenizer, mix["limit"], f"kdcache-teacher-documents-{seed}",
                                     prose_seed=10_000 + seed)
        # a kind whose shortest document does not fit the limit is left out (prose instead)
        shares = {kind: mix[f"{kind}_share"] if self.source.fits(kind) else 0.0
                  for kind in ("passkey", "copy")}
        self.kinds = ("passkey", "copy", "text")
        self.weights = (shares["passkey"], shares["copy"], 1.0 - sum(shares.values()))
        self.buffer: list[int] = []

    def _kind(self) -> str:
        return self.source.rng.choices(self.kinds, weights=self.weights)[0]

    def batch(self):
        import torch

        need = self.rows * self.row
        bos, eos = self.tok.bos_token_id, self.tok.eos_token_id
        while len(self.buffer) < need:
            text = self.source.draw(self._kind())
            ids = self.tok(text, add_special_tokens=False)["input_ids"][:self.limit - 2]
            self.buffer += [bos, *ids, eos]
        rows = torch.tensor(self.buffer[:need], dtype=torch.long).view(self.rows, self.row)
        del self.buffer[:need]  # a document cut at a row's end goes on in the next step's row
        return rows, rows

    def positions(self, context: int, generator):
        """Position ids [rows, row] from a random offset per row in [0, context - row]: the
        dumps put a short document anywhere in a long window at its global position
        (`document-global`), so the teacher learns the documents at every position it will be
        asked about (trained only at 0..row it predicts the haystack of a document at 12k
        badly: toy, H200, fifth run: teacher perplexity 11.1 on passkey documents, CE 1.02)."""
        import torch

        offsets = torch.randint(0, max(1, context - self.row + 1), (self.rows, 1),
                                generator=generator)
        return offsets + torch.arange(self.row)


PROSE_ONLY = {"limit": 256, "passkey_share": 0.0, "copy_share": 0.0}  # without `documents`


def answers_right(logits, ids, answer_mask) -> list[bool]:
    """Per row: every answer token is the argmax of the logits before it (greedy decoding of
    the answer, teacher-forced)."""
    pred = logits[:, :-1].argmax(-1)
    wrong = (pred != ids[:, 1:]) & answer_mask[:, 1:]
    return (~wrong.any(-1)).tolist()


class Ladder:
    """The passkey length curriculum and its trajectory (accuracy and loss per rung)."""

    def __init__(self, lengths: list[int], rng: random.Random) -> None:
        self.lengths, self.rng, self.open = lengths, rng, 1
        self.stats = {n: {"steps": 0, "samples": 0, "accuracy": None, "loss": None}
                      for n in lengths}
        self.opened: list[dict] = [{"length": lengths[0], "step": 0, "seconds": 0.0}]

    def pick(self) -> int:
        top = self.lengths[self.open - 1]
        return top if self.rng.random() < 0.5 else self.rng.choice(self.lengths[:self.open])

    def update(self, length: int, right: list[bool], loss: float, step: int,
               seconds: float) -> bool:
        """Record a passkey step; True when it opened the next rung."""
        s = self.stats[length]
        acc = sum(right) / len(right)
        s["steps"] += 1
        s["samples"] += len(right)
        # running means over roughly the last 10 steps at this rung
        s["accuracy"] = acc if s["accuracy"] is None else 0.9 * s["accuracy"] + 0.1 * acc
        s["loss"] = loss if s["loss"] is None else 0.9 * s["loss"] + 0.1 * loss
        if (length == self.lengths[self.open - 1] and self.open < len(self.lengths)
                and s["steps"] >= 5 and s["accuracy"] >= PROMOTE):
            self.open += 1
            self.opened.append({"length": self.lengths[self.open - 1], "step": step,
                                "seconds": round(seconds, 1)})
            return True
        return False

    def summary(self) -> dict:
        return {"lengths": self.lengths, "longest_open": self.lengths[self.open - 1],
                "opened": self.opened,
                "by_length": {str(n): {k: (round(v, 4) if isinstance(v, float) else v)
                                       for k, v in s.items()} for n, s in self.stats.items()}}


def tokenizer_ready(out_dir: str) -> str:
    """The file a teacher in training writes once its tokenizer is saved (what the corpus, which
    needs only the tokenizer, waits for)."""
    return os.path.join(out_dir, "kdcache_tokenizer_ready.json")


def teacher_record(out_dir: str) -> str:
    """The JSON record a trained teacher leaves beside its weights (its presence: trained)."""
    return os.path.join(out_dir, "kdcache_retrieval.json")


def load_teacher_record(out_dir: str) -> dict:
    """The record a trained teacher (or the students' start) left beside its weights."""
    try:
        with open(teacher_record(out_dir)) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise ReplicateError(f"{out_dir}: no readable training record ({exc}); train it first"
                             ) from None


def _check_same_tokenizer(out_dir: str, reference: str) -> None:
    def fingerprint(directory: str) -> str:
        try:
            return tokenizer_hash(directory)  # the identity a dataset records for its teacher
        except OSError as exc:
            raise ReplicateError(f"{directory}: tokenizer files not readable ({exc})") from None

    if fingerprint(out_dir) != fingerprint(reference):
        raise ReplicateError(f"{out_dir}: its tokenizer differs from {reference}'s (its token "
                             "ids would not be the teachers'); build both with the same "
                             "tokenizer_vocab and seed")


def train_retrieval_teacher(out_dir: str, model: dict, *, context: int, seconds: float,
                            device: str = "cpu", seed: int = 0, tokens_per_step: int = 8192,
                            lr: float = 3e-3, max_steps: int | None = None,
                            tokenizer_of: str | None = None, documents: dict | None = None,
                            log: Callable[[str], None] = print) -> dict:
    """Build the teacher into `out_dir` and train it for `seconds` (or `max_steps`, whichever
    comes first); returns its summary (also written to teacher_record(out_dir)).
    `tokenizer_of`: a model directory whose tokenizer this model's must be byte for byte (the
    students' start model learns the teachers' token ids), refused before training otherwise.
    `documents`: the students' kinds of document to train on too (corpus.document_mix: length
    limit and shares), else built-in prose alone (PROSE_ONLY)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    done = teacher_record(out_dir)
    if os.path.exists(done):
        return load_teacher_record(out_dir)
    torch.manual_seed(seed)
    cfg = replace(TeacherConfig(**model), seed=seed, train_seconds=0.0,
                  max_positions=max(model.get("max_positions", 0), 4 * context))
    build_teacher(out_dir, cfg, log=lambda m: None)
    if tokenizer_of is not None:
        _check_same_tokenizer(out_dir, tokenizer_of)
    save_json(tokenizer_ready(out_dir), {"tokenizer": out_dir})
    tok = AutoTokenizer.from_pretrained(out_dir)
    net = LlamaForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).to(device)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    mix = documents or PROSE_ONLY
    docs = DocumentBatches(tok, mix, min(mix["limit"], context), tokens_per_step, seed)
    lengths = passkey_lengths(context)
    passkeys = PasskeyBatches(tok, tokens_per_step, seed) if lengths else None
    ladder = Ladder(lengths, rng) if lengths else None
    copy_ok = 2 * COPY_LENS[0] + 1 <= context
    steps, losses = 0, {"documents": [], "copy": [], "passkey": []}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None
    start = time.perf_counter()
    deadline = start + seconds
    last_log = start
    trajectory: list[dict] = []
    window: dict[str, list[float]] = {k: [] for k in losses}
    # the running copy loss; whether the copying phase still runs; the step that ended it
    copy_loss, copy_phase, copy_phase_steps = None, copy_ok, 0

    def draw(step: int):
        """The next step's (kind, passkey length or None, ids, labels, answer mask or None,
        position ids or None)."""
        u = rng.random()
        if copy_ok and (copy_phase or u >= PASSKEY_SHARE + DOCUMENT_SHARE):
            ids, labels = _copy_batch(cfg.tokenizer_vocab, tokens_per_step, context, g)
            return ("copy", None, ids, labels, None, None)
        if passkeys is not None and u < PASSKEY_SHARE:
            length = ladder.pick()
            return ("passkey", length, *passkeys.batch(length), None)
        return ("documents", None, *docs.batch(), None, docs.positions(context, g))

    upcoming = draw(0)
    while time.perf_counter() < deadline and (max_steps is None or steps < max_steps):
        kind, length, batch, labels, answer_mask, positions = upcoming
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (steps + 1) / WARMUP_STEPS)
        batch, labels = batch.to(device), labels.to(device)
        inputs = dict(input_ids=batch, labels=labels, use_cache=False,
                      position_ids=None if positions is None else positions.to(device))
        if autocast is not None:
            with autocast:
                out = net(**inputs)
        else:
            out = net(**inputs)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        steps += 1
        # The next batch is built while the GPU still runs this step (the reads below wait
        # for it): on a GPU, building a step of short prompts costs about as much as the step.
        upcoming = draw(steps)
        loss = float(out.loss.detach())
        losses[kind].append(loss)
        if kind == "copy":
            copy_loss = loss if copy_loss is None else 0.9 * copy_loss + 0.1 * loss
        if copy_phase and (copy_loss < COPY_DONE or steps >= COPY_STEPS):
            copy_phase = False
            copy_phase_steps = steps
            log(f"replicate: teacher {os.path.basename(out_dir)} step {steps}: copy loss "
                f"{copy_loss:.3f}, copying phase done")
        window[kind].append(loss)
        now = time.perf_counter()
        if steps % TRACE_EVERY == 0:
            # the loss of each kind over the last TRACE_EVERY steps: where the curriculum stalls
            trajectory.append({"step": steps, "seconds": round(now - start, 1)}
                              | {k: round(sum(v) / len(v), 4) for k, v in window.items() if v}
                              | ({"open": ladder.lengths[ladder.open - 1]} if ladder else {}))
            window = {k: [] for k in losses}
        if kind == "passkey":
            right = answers_right(out.logits.detach(), batch, answer_mask.to(device))
            if ladder.update(length, right, loss, steps, now - start):
                log(f"replicate: teacher {os.path.basename(out_dir)} step {steps}: passkey "
                    f"{length} right {ladder.stats[length]['accuracy']:.0%}, now up to "
                    f"{ladder.lengths[ladder.open - 1]} tokens")
        if now - last_log >= 30:
            last_log = now
            log(f"replicate: teacher {os.path.basename(out_dir)} step {steps} "
                + " ".join(f"{k} {sum(v[-20:]) / len(v[-20:]):.3f}"
                           for k, v in losses.items() if v))
    net.eval()
    net.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    mean = lambda v: round(sum(v[-20:]) / len(v[-20:]), 4) if v else None  # noqa: E731
    summary = {"out": out_dir, "context": context, "seconds": seconds,
               "trained_seconds": round(time.perf_counter() - start, 1), "steps": steps,
               "tokens_per_step": tokens_per_step, "lr": lr,
               "copy_phase_steps": copy_phase_steps,
               "final_loss": {k: mean(v) for k, v in losses.items()},
               "passkey": ladder.summary() if ladder else None, "trajectory": trajectory}
    with open(done, "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary
