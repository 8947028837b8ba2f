"""Long-context prompts in RULER's spirit (Hsieh et al. 2024), generated offline and seeded.

Six tasks, RULER's templates (instruction, question, and an answer prefix appended after the chat
template's assistant header):

    passkey     one needle "One of the special magic numbers for KEY is: VALUE." (RULER niah_single)
    multikey    the asked needle among three needles with other keys (niah_multikey_1)
    multivalue  four values under one key, all asked for (niah_multivalue)
    vt          variable tracking: a chain of five assignments VAR A = VALUE, VAR B = VAR A, ... (vt)
    cwe         common-word extraction from a numbered word list: the ten most frequent words (cwe)
    qa          a question over a short fact list inserted into the text (RULER's qa, with the facts as
                the document to read)

Needles go into a haystack of standard-library docstrings (:mod:`.corpus`) at a stated depth: the
fraction of the context's tokens before the needle. A prompt's ``depth`` is its asked needle's (the first
value for multivalue and vt); the other needles sit at seeded depths. Values are 7-digit numbers, keys
two vocabulary words, variables five capital letters, people and towns invented names: none of it can
occur in the calibration prompts (5-digit passkeys, ``name-i`` registers). Everything is seeded by
(task, length, index): the same call gives the same tokens. The prompt (chat template and answer prefix
included) has at most ``length`` tokens of the model's tokenizer and at least 98 % of it.
"""
from __future__ import annotations

import random
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable

from sglang_shplb.evaluation.corpus import load_corpus

DEPTHS = (0.1, 0.5, 0.9, 0.3, 0.7)  # prompt i: DEPTHS[i % 5]; ends and middle first, so a few prompts span it
LENGTH_TOLERANCE = 0.02
_NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the numbers afterwards.")
_SYLLABLES = ("ka", "lo", "ver", "min", "dra", "tus", "bel", "gor", "ani", "rek", "sol", "quin", "zar", "fen",
              "mor", "thi", "pel", "vas", "dun", "ori")
_TOWN_ENDS = ("ford", "wick", "mere", "holt", "stead", "bury", "haven", "crest")


@dataclass(frozen=True)
class Needle:
    text: str
    depth: float  # fraction of the context's tokens before the needle


@dataclass(frozen=True)
class EvalPrompt:
    task: str
    length: int              # target length in tokens
    index: int
    input_ids: list[int]     # chat template and answer prefix included
    context: str             # the haystack with the needles, as it appears in the prompt
    refs: list[str]          # expected values
    depth: float | None      # the asked needle's depth; None where the task has no needle (cwe)
    needles: tuple[Needle, ...]

    @property
    def name(self) -> str:
        return f"{self.task}-{self.length}-{self.index}"


@dataclass(frozen=True)
class _Parts:
    instruction: str
    question: str
    answer_prefix: str
    refs: list[str]


@dataclass(frozen=True)
class Task:
    name: str
    max_new_tokens: int  # what the answer needs with some slack (RULER allows 30-128; sparse decode on CPU is slow)
    scoring: str  # "all": share of the refs found (RULER string_match_all); "part": any ref found
    build: Callable[[random.Random, float], tuple[_Parts, list[Needle]]] | None  # None: cwe (its own builder)


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _key(rng: random.Random, taken: set[str]) -> str:
    vocab = load_corpus().vocabulary
    while (key := f"{rng.choice(vocab)}-{rng.choice(vocab)}") in taken:
        pass
    taken.add(key)
    return key


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _single_question(key: str, value: str) -> _Parts:
    return _Parts(_NIAH_INSTRUCTION,
                  f"What is the special magic number for {key} mentioned in the provided text?",
                  f"The special magic number for {key} mentioned in the provided text is", [value])


def _other_depths(rng: random.Random, depth: float, n: int, gap: float = 0.05) -> list[float]:
    """``n`` seeded depths for the needles not asked about, ``gap`` apart from each other and from ``depth``
    (closer needles would push each other off their depths)."""
    taken = [depth]
    while len(taken) <= n:
        d = round(rng.uniform(0.05, 0.95), 3)
        if all(abs(d - t) >= gap for t in taken):
            taken.append(d)
    return taken[1:]


def _passkey(rng: random.Random, depth: float):
    key, value = _key(rng, set()), _value(rng)
    return _single_question(key, value), [Needle(_magic(key, value), depth)]


def _multikey(rng: random.Random, depth: float):
    taken: set[str] = set()
    key, value = _key(rng, taken), _value(rng)
    others = [Needle(_magic(_key(rng, taken), _value(rng)), d) for d in _other_depths(rng, depth, 3)]
    return _single_question(key, value), [Needle(_magic(key, value), depth), *others]


def _multivalue(rng: random.Random, depth: float):
    key = _key(rng, set())
    values: list[str] = []
    while len(values) < 4:
        if (v := _value(rng)) not in values:
            values.append(v)
    depths = [depth, *_other_depths(rng, depth, len(values) - 1)]
    parts = _Parts(_NIAH_INSTRUCTION,
                   f"What are all the special magic numbers for {key} mentioned in the provided text?",
                   f"The special magic numbers for {key} mentioned in the provided text are", values)
    return parts, [Needle(_magic(key, v), d) for v, d in zip(values, depths)]


def _variables(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        if (v := "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))) not in names:
            names.append(v)
    return names


def _vt(rng: random.Random, depth: float, hops: int = 4):
    names, value = _variables(rng, hops + 1), _value(rng)
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = [round(depth + (1 - depth) * k / (hops + 1), 3) for k in range(hops + 1)]  # in order, after `depth`
    parts = _Parts("Memorize and track the chain(s) of variable assignment hidden in the following text.",
                   f"Question: Find all variables that are assigned the value {value} in the text above.",
                   f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
                   f"variables are assigned the value {value}, they are:", names)
    return parts, [Needle(s, d) for s, d in zip(statements, depths)]


def _invented(rng: random.Random, taken: set[str], end: str = "") -> str:
    while (name := "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize() + end) in taken:
        pass
    taken.add(name)
    return name


def _qa(rng: random.Random, depth: float, facts: int = 5):
    taken: set[str] = set()
    people = [_invented(rng, taken) for _ in range(facts)]
    towns = [_invented(rng, taken, rng.choice(_TOWN_ENDS)) for _ in range(facts)]
    asked = rng.randrange(facts)
    block = "Here is a short list of facts. " + " ".join(
        f"{p} lives in the town of {t}." for p, t in zip(people, towns)) + " End of the list."
    parts = _Parts("Answer the question based on the given text. Only give me the answer and do not output any "
                   "other words.", f"Question: In which town does {people[asked]} live?",
                   f"Answer: {people[asked]} lives in the town of", [towns[asked]])
    return parts, [Needle(block, depth)]


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("passkey", 12, "all", _passkey),
    Task("multikey", 12, "all", _multikey),
    Task("multivalue", 44, "all", _multivalue),
    Task("vt", 24, "all", _vt),
    Task("cwe", 48, "all", None),
    Task("qa", 10, "part", _qa),
)}


# ---- rendering and length control -------------------------------------------------------------------------

def _render(tokenizer, parts: _Parts, context: str) -> list[int]:
    content = f"{parts.instruction}\n{context}\n{parts.question}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text + parts.answer_prefix, add_special_tokens=False)["input_ids"]


def _fit(length: int, make: Callable[[int], tuple[list[int], str]], hi: int) -> tuple[list[int], str]:
    """The largest size ``k`` in [0, hi] whose prompt ``make(k)`` has at most ``length`` tokens."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(make(mid)[0]) <= length:
            lo = mid
        else:
            hi = mid - 1
    ids, context = make(lo)
    if not (1 - LENGTH_TOLERANCE) * length <= len(ids) <= length:
        raise ValueError(f"cannot fit a prompt of {length} tokens (got {len(ids)}): is {length} too short?")
    return ids, context


def _stream(rng: random.Random, words: int) -> list[list[str]]:
    """Haystack units (each a list of words) of shuffled docstring paragraphs, at least ``words`` words."""
    paragraphs = list(load_corpus().paragraphs)
    rng.shuffle(paragraphs)
    out, n = [], 0
    for p in paragraphs * (1 + words // 40_000):  # the corpus holds ~55K words
        for unit in p:
            out.append(unit.split())
            n += len(out[-1])
        if n >= words:
            return out
    raise ValueError(f"the corpus cannot fill {words} words")


def _take(units: list[list[str]], words: int) -> list[str]:
    out = []
    for u in units:
        if words <= 0:
            break
        out.append(" ".join(u[:words]))
        words -= len(u)
    return out


def place_needles(tokenizer, units: list[str], needles: list[Needle], slack: float = 0.01) -> str:
    """``units`` joined by spaces, each needle at the unit boundary nearest its depth in tokens, or at the
    nearest word boundary where no unit boundary is within ``slack`` of the context's tokens."""
    words, unit_starts = [], []
    for u in units:
        unit_starts.append(len(words))
        words += u.split()
    unit_starts.append(len(words))
    enc = tokenizer(" ".join(words), add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in enc["offset_mapping"]]
    chars, cum = 0, []
    for w in words:  # tokens before each word boundary
        cum.append(bisect_left(starts, chars))
        chars += len(w) + 1
    cum.append(len(starts))
    sizes = [len(tokenizer(" " + n.text, add_special_tokens=False)["input_ids"]) for n in needles]
    total = len(starts) + sum(sizes)
    slots: dict[int, list[str]] = {}
    before, floor = 0, 0
    for i in sorted(range(len(needles)), key=lambda i: needles[i].depth):
        want = needles[i].depth * total - before
        b = min((j for j in unit_starts if j >= floor), key=lambda j: abs(cum[j] - want))
        if abs(cum[b] - want) > slack * total:
            b = min(range(floor, len(cum)), key=lambda j: abs(cum[j] - want))
        slots.setdefault(b, []).append(needles[i].text)
        before, floor = before + sizes[i], b
    pieces = []
    for b in range(len(words) + 1):
        pieces += slots.get(b, [])
        pieces += words[b:b + 1]
    return " ".join(pieces)


def _needle_prompt(tokenizer, task: Task, length: int, index: int) -> EvalPrompt:
    rng = random.Random(f"shplb-eval-{task.name}-{length}-{index}")
    depth = DEPTHS[index % len(DEPTHS)]
    parts, needles = task.build(rng, depth)
    units = _stream(rng, length)  # ~1.3 tokens per word: more words than needed

    def make(words: int) -> tuple[list[int], str]:
        context = place_needles(tokenizer, _take(units, words), needles)
        return _render(tokenizer, parts, context), context

    ids, context = _fit(length, make, sum(map(len, units)))
    return EvalPrompt(task.name, length, index, ids, context, parts.refs, depth, tuple(needles))


def common_word_frequency(length: int) -> int:
    """How often each of the ten common words appears: RULER's 30 at 4K and above, fewer below."""
    return max(5, min(30, length // 140))


def _cwe_prompt(tokenizer, length: int, index: int, common: int = 10, rare_freq: int = 3) -> EvalPrompt:
    rng = random.Random(f"shplb-eval-cwe-{length}-{index}")
    words = list(load_corpus().vocabulary)
    rng.shuffle(words)
    top, rare, freq, order = words[:common], words[common:], common_word_frequency(length), rng.random()
    parts = _Parts("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.",
                   f"Question: What are the {common} most common words in the above list?",
                   f"Answer: The top {common} words that appear most often in the list are:", top)

    def make(rare_items: int) -> tuple[list[int], str]:
        items = [w for w in top for _ in range(freq)] + \
                [w for w in rare[:rare_items // rare_freq + 1] for _ in range(rare_freq)][:rare_items]
        random.Random(order).shuffle(items)
        context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return _render(tokenizer, parts, context), context

    ids, context = _fit(length, make, min(length, rare_freq * len(rare)))
    return EvalPrompt("cwe", length, index, ids, context, top, None, ())


def make_prompt(tokenizer, task: str, length: int, index: int) -> EvalPrompt:
    if task not in TASKS:
        raise ValueError(f"unknown eval task {task!r}; tasks: {', '.join(TASKS)}")
    if task == "cwe":
        return _cwe_prompt(tokenizer, length, index)
    return _needle_prompt(tokenizer, TASKS[task], length, index)


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _worker_prompt(job: tuple[str, int, int]) -> EvalPrompt:
    return make_prompt(_WORKER_TOKENIZER, *job)


def eval_prompts(tokenizer, tasks: list[str], lengths: list[int], per_task: int,
                 progress: Callable[[], None] | None = None, workers: int = 1) -> list[EvalPrompt]:
    """``per_task`` prompts per task and length, depths cycling through :data:`DEPTHS`; ``progress`` is
    called after each (fitting a prompt to its length tokenizes it several times: ~0.5-1 s at 8K), ``workers``
    processes make them (the same prompts, in the same order, for any number)."""
    jobs = [(t, n, i) for t in tasks for n in lengths for i in range(per_task)]
    if workers <= 1:
        made = (make_prompt(tokenizer, *job) for job in jobs)
        pool = None
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker, (tokenizer,))
        made = pool.map(_worker_prompt, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
    out = []
    try:
        for p in made:
            out.append(p)
            if progress is not None:
                progress()
    finally:
        if pool is not None:
            pool.shutdown()
    return out
