"""Calibration prompts, generated offline from text that ships with Python itself.

The filler is the Python language reference (``pydoc_data.topics``, part of the standard library),
cut into paragraphs. Into each document we insert a few "needles" (a passkey and key-value facts)
at seeded depths and end with a retrieval question, so that retrieval heads have something to
retrieve. Two disjoint sets (``"A"``, ``"B"``) draw from disjoint halves of the topics: the
stability score compares the budgets each set asks for.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from pydoc_data.topics import topics as _TOPICS

_NAMES = ["amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
          "kelp", "lumen", "marble", "nectar", "onyx", "prairie", "quartz", "russet", "sierra", "tundra"]


@dataclass(frozen=True)
class CalibrationPrompt:
    name: str
    input_ids: list[int]
    answer: str                                # one value, or several joined by ", " (``"values"``)
    needles: tuple[tuple[int, int], ...] = ()  # token ranges [start, end) of the needles; the first holds the answer
    question: str = "passkey"                  # what it asks (:data:`QUESTIONS`)

    @property
    def answers(self) -> tuple[str, ...]:
        """The values a right reply names, each of them."""
        return tuple(self.answer.split(", "))


def needle_spans(tokenizer, input_ids: list[int], needles: list[str]) -> tuple[tuple[int, int], ...]:
    """Where each needle's tokens stand in ``input_ids``: its tokens without the first and last (which
    merge with their neighbours differently in context), found as a run; a needle not found is an error."""
    spans = []
    for text in needles:
        core = tokenizer.encode(text, add_special_tokens=False)[1:-1]
        at = next((i for i in range(len(input_ids) - len(core) + 1) if input_ids[i:i + len(core)] == core), None)
        if at is None:
            raise ValueError(f"needle {text!r} not found in the prompt's tokens")
        spans.append((at, at + len(core)))
    return tuple(spans)


def _paragraphs(calib_set: str) -> list[str]:
    keys = sorted(_TOPICS)
    if calib_set not in ("A", "B"):
        raise ValueError(f"calibration set must be 'A' or 'B', got {calib_set!r}")
    half = keys[0::2] if calib_set == "A" else keys[1::2]
    paras = []
    for key in half:
        for p in _TOPICS[key].split("\n\n"):
            p = " ".join(p.split())
            if len(p) > 80:
                paras.append(p)
    return paras


#: what a calibration document asks at its end: the pass key, the value of one of its registers (a
#: key-value lookup among distractors), a word from a short list of facts inserted as one block (the
#: eval's qa task reads such a list; its names, words and wording are not these), every value one
#: register took (:data:`VALUES` needles at depths of their own: the answer copies several needles in
#: turn, so its later tokens read what the first did not; the eval's multivalue task asks 7-digit
#: "special magic numbers", never registers), or the keeper of a lighthouse from such a list (an invented
#: name of several tokens, copied whole, as the eval's qa answers an invented town name; the keepers'
#: syllables are not the eval's)
QUESTIONS = ("passkey", "register", "facts", "values", "keepers")
#: the questions refine's held-in prompts ask unless told: those of the last refine measured in bf16
#: (``bench/results/eval_h200_round7``); ``"keepers"`` is asked on request until it is measured there
DEFAULT_QUESTIONS = ("passkey", "register", "facts", "values")
_COLOURS = ["crimson", "scarlet", "teal", "olive", "violet", "ochre", "silver", "ivory", "maroon", "navy",
            "saffron", "azure"]
#: a keeper's name is two or three of these (none of them is one of the eval's qa syllables)
_KEEPER_SYLLABLES = ("bra", "vost", "el", "nim", "tor", "ush", "pra", "lev", "ik", "gosk", "ard", "wen", "hul",
                     "ost", "rin", "tav")
FACTS = 5


def _keepers(rng: random.Random) -> list[str]:
    """:data:`FACTS` distinct invented names."""
    names: list[str] = []
    while len(names) < FACTS:
        name = "".join(rng.choice(_KEEPER_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in names:
            names.append(name)
    return names


@dataclass(frozen=True)
class _FactList:
    what: str        # the block's heading: "the {what} of the lighthouses"
    sentence: str    # one fact, of lighthouse {n} and answer {a}
    ask: str         # the question about lighthouse {n}
    suffix: str      # the prompt's name ends "-{lighthouse}-{suffix}"
    draw: Callable[[random.Random], list[str]]   # the FACTS distinct answers


#: the questions that read a block of lighthouse facts: a colour (a common word) or a keeper (an invented name)
_FACT_LISTS = {
    "facts": _FactList("colours", "The {n} lighthouse is painted {a}.",
                       "What colour is the {n} lighthouse painted? Answer with the colour only.", "lighthouse",
                       lambda rng: rng.sample(_COLOURS, FACTS)),
    "keepers": _FactList("keepers", "The keeper of the {n} lighthouse is {a}.",
                         "Who is the keeper of the {n} lighthouse? Answer with the name only.", "keeper",
                         _keepers),
}


def _fact_list(rng: random.Random, kind: _FactList) -> tuple[str, str, str, str]:
    """A block of :data:`FACTS` lighthouses with their colours or keepers (``kind``), and the asked fact: its
    sentence, lighthouse and answer."""
    names = [n.capitalize() for n in rng.sample(_NAMES, FACTS)]
    answers = kind.draw(rng)
    facts = [kind.sentence.format(n=n, a=a) for n, a in zip(names, answers)]
    block = f"From the harbour log, the {kind.what} of the lighthouses: " + " ".join(facts) + " That is the whole log."
    at = rng.randrange(FACTS)
    return block, facts[at], names[at], answers[at]


VALUES = 3


def _values_needles(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """A register of its own (not one of the document's three) and :data:`VALUES` distinct values it took,
    each with its needle."""
    register = f"{rng.choice(_NAMES)}-{rng.randint(10, 99)}"
    values = [str(v) for v in rng.sample(range(100, 1000), VALUES)]
    return register, [(v, f"One of the values of the register {register} is {v}.") for v in values]


def make_prompt(tokenizer, length: int, calib_set: str = "A", seed: int = 0,
                question: str = "passkey") -> CalibrationPrompt:
    """A chat-formatted document of exactly ``length`` tokens (filler trimmed to fit) with needles
    inside and a retrieval question at the end (:data:`QUESTIONS`); the answer's needle is the first of
    ``needles``. The pass key and register needles and their depths do not depend on ``question``;
    ``"facts"`` and ``"keepers"`` add one block of facts at a depth of its own, ``"values"`` its needles at
    depths of their own (drawn apart, so the other draws stay); the answer of ``"values"`` is the values in
    document order, joined by ", " (:attr:`CalibrationPrompt.answers`), its needles first in that order."""
    if question not in QUESTIONS:
        raise ValueError(f"calibration question must be one of {QUESTIONS}, got {question!r}")
    rng = random.Random(f"{calib_set}-{length}-{seed}")
    paras = _paragraphs(calib_set)
    rng.shuffle(paras)
    passkey = str(rng.randint(10000, 99999))
    facts = {rng.choice(_NAMES) + "-" + str(i): str(rng.randint(100, 999)) for i in range(3)}
    needles = [f"The pass key is {passkey}. Remember it. {passkey} is the pass key."] + \
              [f"The value of the register {k} is {v}." for k, v in facts.items()]
    asked = random.Random(f"{calib_set}-{length}-{seed}-register").choice(sorted(facts))
    extra: list[tuple[float, str]] = []
    if question == "passkey":
        answer, ask = passkey, "What is the pass key? Answer with the number only."
    elif question == "register":
        answer, ask = facts[asked], f"What is the value of the register {asked}? Answer with the number only."
    elif question in _FACT_LISTS:
        frng = random.Random(f"{calib_set}-{length}-{seed}-{question}")
        block, sentence, name, answer = _fact_list(frng, _FACT_LISTS[question])
        extra = [(frng.random(), block)]
        ask = _FACT_LISTS[question].ask.format(n=name)
    else:
        vrng = random.Random(f"{calib_set}-{length}-{seed}-values")
        register, pairs = _values_needles(vrng)
        at = sorted((vrng.random(), v, n) for v, n in pairs)   # in document order
        extra = [(d, n) for d, _, n in at]
        value_needles = [n for _, _, n in at]
        answer = ", ".join(v for _, v, _ in at)
        ask = (f"What are all the values of the register {register}? Answer with the numbers only, "
               f"separated by commas.")

    def render(body_paras: list[str]) -> list[int]:
        messages = [{"role": "user", "content": "\n\n".join(body_paras) + "\n\n" + ask}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)

    depths = sorted(rng.random() for _ in needles)
    placed = sorted(list(zip(depths, needles)) + extra)

    def with_needles(filler: list[str]) -> list[str]:
        out = list(filler)
        for j, (d, needle) in enumerate(placed):  # + j: the needles inserted before it
            out.insert(int(d * len(filler)) + j, needle)
        return out

    # grow the filler until it passes the length, then drop whole paragraphs until the document with its
    # needles fits, and top up with filler tokens (the needles are never cut)
    body: list[str] = []
    i = 0
    while True:
        body.append(paras[i % len(paras)])
        i += 1
        if i % 8 == 0 and len(render(body)) > length:
            break
    while len(render(with_needles(body))) > length and len(body) > 1:
        body.pop()
    ids = render(with_needles(body))
    if len(ids) > length and len(body) == 1:   # one paragraph is left, after the needles: trimming would cut them
        raise ValueError(f"a calibration prompt of {length} tokens is too short for the {question!r} question: its "
                         f"needles and question alone take {len(render(with_needles([])))} tokens; ask for more")
    # the chat header ends where two renders with different bodies start to differ
    a, b = render(["alpha"]), render(["omega"])
    head = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
    if len(ids) > length:  # drop filler tokens right after the header
        ids = ids[:head] + ids[head + len(ids) - length:]
    elif len(ids) < length:  # or top up with filler there
        filler = tokenizer.encode(paras[(i + 1) % len(paras)] + "\n\n", add_special_tokens=False)
        pad = (filler * (1 + (length - len(ids)) // max(1, len(filler))))[: length - len(ids)]
        ids = ids[:head] + pad + ids[head:]
    spans = needle_spans(tokenizer, ids, needles)
    if question == "register":   # the asked register's needle first
        at = 1 + list(facts).index(asked)
        spans = (spans[at],) + spans[:at] + spans[at + 1:]
        return CalibrationPrompt(f"{calib_set}{seed}-{length}-{asked}", ids, answer, spans, question)
    if question in _FACT_LISTS:   # the asked fact first, then the block, then the other needles
        spans = needle_spans(tokenizer, ids, [sentence, block]) + spans
        return CalibrationPrompt(f"{calib_set}{seed}-{length}-{name.lower()}-{_FACT_LISTS[question].suffix}", ids,
                                 answer, spans, question)
    if question == "values":     # the values' needles first, in document order
        spans = needle_spans(tokenizer, ids, value_needles) + spans
        return CalibrationPrompt(f"{calib_set}{seed}-{length}-{register}-values", ids, answer, spans, question)
    return CalibrationPrompt(f"{calib_set}{seed}-{length}", ids, answer, spans)


def calibration_prompts(tokenizer, lengths: list[int], calib_set: str, per_length: int = 1) -> list[CalibrationPrompt]:
    return [make_prompt(tokenizer, n, calib_set, s) for n in lengths for s in range(per_length)]


_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer, length: int, seed: int = 0) -> CalibrationPrompt:
    """The classic passkey-retrieval prompt (repetitive filler, one passkey at a seeded depth), about
    ``length`` tokens: the quality check's test, the one small models are known to pass densely."""
    rng = random.Random(f"passkey-{length}-{seed}")
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    per = len(tokenizer.encode(_FILLER, add_special_tokens=False))
    reps = max(1, (length - 80) // per)
    at = int(rng.uniform(0.1, 0.9) * reps)
    body = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            + _FILLER * at + needle + _FILLER * (reps - at)
            + "\nWhat is the pass key?")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return CalibrationPrompt(f"passkey{seed}-{length}", ids, key)
