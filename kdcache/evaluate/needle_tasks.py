"""Needle-in-a-haystack samples built to exact token lengths with the model's own tokenizer.

Tasks (prompts are plain completions for base models, no chat template):

- `passkey` (landmark attention, Mohtashami & Jaggi 2023): instruction, the filler "The grass is
  green. The sky is blue. The sun is yellow. Here we go. There and back again." repeated, the
  needle "The pass key is {k}. Remember it. {k} is the pass key." at the requested depth, then
  "What is the pass key? The pass key is". Score: the first integer generated equals k.
- `niah_single`, `niah_multikey`, `niah_multivalue`, `niah_multiquery` (RULER, Hsieh et al.
  2024): needles "One of the special magic {type} for {key} is: {value}." with values that are
  7-digit numbers, adjective-noun words, or UUIDs; multikey adds 3 distractor keys, multivalue
  puts 4 values under the queried key, multiquery asks for 4 keys at once. Score:
  string_match_all, the fraction of expected values present in the output (case-insensitive).

Exact lengths: every piece (instruction, each haystack sentence, each needle, question) is
tokenized on its own and the ids are concatenated, so the prompt is exactly `length` tokens
(BOS included when the tokenizer has one); the haystack's last sentence is cut to fit. Needles
go in at sentence boundaries: the queried needle at the boundary nearest `depth` (fraction of the
haystack), other needles at seeded random boundaries. `distance` is the number of tokens between
the end of the farthest queried needle and the start of the question (the paper's x-axis).
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from kdcache.evaluate.models import EvalError

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
VALUE_TYPES = ("numbers", "words", "uuids")
NOISE_SENTENCE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again.")
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize them. I will quiz you about the important information there.")
PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
NIAH_INTRO = ("Some special magic {type} are hidden within the following text. Make sure to "
              "memorize it. I will quiz you about the {type} afterwards.")
NIAH_NEEDLE = "One of the special magic {type} for {key} is: {value}."
NIAH_QUESTION = ("What are all the special magic {type} for {query} mentioned in the provided "
                 "text? The special magic {type} for {query} mentioned in the provided text are")
ADJECTIVES = ("abashed able absent acid aged alert ample ancient angry arctic autumn bold brave "
              "brief bright broad busy calm candid cheap chief chilly civil clean clever close "
              "cozy crisp curly damp dark dear deep dense dizzy dry dull eager early easy empty "
              "equal exact faint fair false fancy fast fierce firm flat fond frank fresh gentle "
              "giant glad grand grave great green grim gross happy hardy harsh hasty heavy hidden "
              "hollow honest huge humble icy idle jolly keen kind large late lazy lean light "
              "little lively loud loyal lucky mad major mellow mild minor misty modern moist "
              "narrow neat noble noisy odd open pale plain polite proud quick quiet rapid rare "
              "raw ready rich rigid rough round royal rusty sad safe salty sharp shiny short shy "
              "silent silly simple sleek slim slow smart smooth soft solid sour spare stable "
              "steep stiff still stout strong sunny sweet swift tall tame tender thick thin tidy "
              "tiny tough vast vivid warm wary weak wet wide wild wise witty young zesty").split()
NOUNS = ("anchor apple arrow badge baker bamboo banjo barn basket beacon bear beetle bell bench "
         "bison blanket boat bottle bridge brook bucket cabin camel candle canyon carpet castle "
         "cedar chair cherry circle cliff clock cloud comet copper coral cotton crane crow crystal "
         "desert dolphin donkey dragon drum eagle engine falcon feather fern field flute forest "
         "fox garden garlic glacier goat harbor hawk heron hill honey horse island ivory jacket "
         "jungle kettle kite ladder lake lantern lemon lion lizard maple marble meadow mirror "
         "monkey moon mountain needle nest oak ocean olive orchard otter owl panda parrot pearl "
         "pebble pepper piano pillow pine planet pond quartz rabbit raven river robin rocket "
         "saddle salmon sand shark shell silver sparrow spider spoon squirrel star stone storm "
         "sugar swan table thunder tiger timber tower trout tulip turtle valley violin walnut "
         "whale willow window wolf zebra").split()
MULTI_NEEDLES = 4  # RULER's num_needle_k / num_needle_v / num_needle_q for the multi variants


@dataclass
class NeedleSample:
    task: str
    value_type: str
    length: int
    depth: float  # requested depth of the queried needle, fraction of the haystack
    input_ids: list[int]
    answers: list[str]
    distance: int  # tokens between the farthest queried needle's end and the question
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in input_ids
    queried: list[int] = field(default_factory=list)  # indices into needle_spans


def _value(rng: random.Random, value_type: str) -> str:
    if value_type == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if value_type == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if value_type == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise EvalError(f"unknown value type {value_type!r}; choose from {', '.join(VALUE_TYPES)}")


def _distinct(rng: random.Random, count: int, make) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        v = make()
        if v not in out:
            out.append(v)
    return out


def split_sentences(text: str) -> list[str]:
    """Split text into sentences (on . ! ? followed by whitespace); keeps the punctuation."""
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if p]


class Haystack:
    """A source of sentences, tokenized once: the noise sentence or the user's documents."""

    def __init__(self, tokenizer: Any, texts: Sequence[str] | None = None) -> None:
        sentences = [NOISE_SENTENCE] if not texts else [s for t in texts
                                                        for s in split_sentences(t)]
        if not sentences:
            raise EvalError("the haystack documents contain no text")
        self.name = "noise" if not texts else "documents"
        self.tokens = [tokenizer(" " + s, add_special_tokens=False)["input_ids"]
                       for s in sentences]
        self.tokens = [t for t in self.tokens if t]

    def fill(self, budget: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """Exactly `budget` tokens of haystack and the sentence boundaries (token offsets)."""
        ids: list[int] = []
        bounds = [0]
        start = rng.randrange(len(self.tokens)) if self.name == "documents" else 0
        j = start
        while len(ids) < budget:
            ids.extend(self.tokens[j % len(self.tokens)])
            bounds.append(min(len(ids), budget))
            j += 1
        return ids[:budget], sorted(set(bounds))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def shortest_passkey(tokenizer: Any) -> int:
    """Tokens of the shortest passkey prompt: BOS, instruction, needle, question and no haystack
    (+ slack for keys that take more tokens)."""
    pieces = (PASSKEY_INTRO, " " + PASSKEY_QUESTION, " " + PASSKEY_NEEDLE.format(value=99999))
    return 1 + 4 + sum(len(_encode(tokenizer, p)) for p in pieces)


def build_sample(tokenizer: Any, haystack: Haystack, task: str, value_type: str, length: int,
                 depth: float, rng: random.Random) -> NeedleSample:
    """One prompt of exactly `length` tokens (see the module docstring)."""
    if task not in TASKS:
        raise EvalError(f"unknown needle task {task!r}; choose from {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise EvalError(f"needle depth must be in [0, 1], got {depth}")
    key_of = lambda: f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"  # noqa: E731
    if task == "passkey":
        key = str(rng.randint(10_000, 99_999))
        intro, question = PASSKEY_INTRO, " " + PASSKEY_QUESTION
        needles, queried, answers = [PASSKEY_NEEDLE.format(value=key)], [0], [key]
    else:
        kind = value_type
        n_keys = MULTI_NEEDLES if task in ("niah_multikey", "niah_multiquery") else 1
        n_values = MULTI_NEEDLES if task == "niah_multivalue" else 1
        keys = _distinct(rng, n_keys, key_of)
        values = _distinct(rng, n_keys * n_values, lambda: _value(rng, value_type))
        needles, owners = [], []
        for ki, key in enumerate(keys):
            for vi in range(n_values):
                needles.append(NIAH_NEEDLE.format(type=kind, key=key,
                                                  value=values[ki * n_values + vi]))
                owners.append(ki)
        queried_keys = list(range(n_keys)) if task == "niah_multiquery" else [0]
        queried = [i for i, o in enumerate(owners) if o in queried_keys]
        answers = [values[i] for i in queried]
        names = [keys[k] for k in queried_keys]
        query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
        intro = NIAH_INTRO.format(type=kind)
        question = " " + NIAH_QUESTION.format(type=kind, query=query)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prefix = bos + _encode(tokenizer, intro)
    suffix = _encode(tokenizer, question)
    needle_ids = [_encode(tokenizer, " " + text) for text in needles]
    budget = length - len(prefix) - len(suffix) - sum(len(n) for n in needle_ids)
    if budget < 0:
        raise EvalError(f"length {length} is too short for {task}: instruction, needles and "
                        f"question alone take {length - budget} tokens")
    hay, bounds = haystack.fill(budget, rng)
    # The first queried needle at the requested depth, the others at random boundaries.
    target = min(bounds, key=lambda b: abs(b - depth * budget))
    places = [target if i == queried[0] else rng.choice(bounds) for i in range(len(needles))]
    order = sorted(range(len(needles)), key=lambda i: (places[i], i))
    ids, spans, cursor = list(prefix), [None] * len(needles), 0
    for i in order:
        ids.extend(hay[cursor:places[i]])
        cursor = max(cursor, places[i])
        spans[i] = (len(ids), len(ids) + len(needle_ids[i]))
        ids.extend(needle_ids[i])
    ids.extend(hay[cursor:])
    question_start = len(ids)
    ids.extend(suffix)
    assert len(ids) == length, (len(ids), length)
    distance = question_start - min(spans[i][1] for i in queried)
    return NeedleSample(task=task, value_type=value_type if task != "passkey" else "numbers",
                        length=length, depth=depth, input_ids=ids, answers=answers,
                        distance=distance, needle_spans=spans, queried=queried)


def build_samples(tokenizer: Any, task: str, value_type: str, lengths: Sequence[int],
                  depths: Sequence[float], samples_per_cell: int, seed: int = 0,
                  haystack_texts: Sequence[str] | None = None) -> list[NeedleSample]:
    """lengths x depths x samples_per_cell prompts, seeded (same seed, same prompts)."""
    haystack = Haystack(tokenizer, haystack_texts)
    out = []
    for length in lengths:
        for depth in depths:
            for s in range(samples_per_cell):
                rng = random.Random(f"{seed}:{task}:{value_type}:{length}:{depth}:{s}")
                out.append(build_sample(tokenizer, haystack, task, value_type, length, depth, rng))
    return out


def score(task: str, output: str, answers: list[str]) -> float:
    """passkey: 1.0 when the first integer in the output equals the key, else 0.0.
    niah_*: RULER's string_match_all, the fraction of answers found in the output."""
    if task == "passkey":
        match = re.search(r"\d+", output)
        return float(match is not None and match.group(0) == answers[0])
    lowered = output.lower()
    return sum(a.lower() in lowered for a in answers) / len(answers)
