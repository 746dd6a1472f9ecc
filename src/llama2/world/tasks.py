"""Helpfulness tasks with checkable answers (the world's stand-in for paper §3.1/§3.4 prompts).

Each family draws a short question and a templated gold answer ("3 plus 4 is 7."): templated so
that a tiny model can learn the shape, checkable so that the simulated annotator can grade it.
`meta["check"]` names the rule the annotator applies; `meta["keys"]` are the words a relevant
answer mentions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

from llama2.world.facts import (
    ATTRIBUTES,
    FACT_QUESTIONS,
    NOUNS_EVERYDAY,
    WORDS,
    Entity,
    fact_sentence,
)

Task = tuple[str, str, dict[str, Any]]  # (user text, gold answer, meta)

NOUNS = NOUNS_EVERYDAY
STARTERS: tuple[str, ...] = ("Today", "My", "Every", "Sometimes", "Yesterday", "Our")


def _arith(rng: random.Random) -> Task:
    op = rng.choice(("plus", "plus", "minus", "times"))
    if op == "plus":
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        c = a + b
        q = rng.choice((f"What is {a} plus {b}?", f"Add {a} and {b}.",
                        f"What do you get if you add {a} and {b}?"))
    elif op == "minus":
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
        c = a - b
        q = rng.choice((f"What is {a} minus {b}?", f"Subtract {b} from {a}.",
                        f"What is {a} take away {b}?"))
    else:
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        c = a * b
        q = rng.choice((f"What is {a} times {b}?", f"Multiply {a} by {b}."))
    return q, f"{a} {op} {b} is {c}.", {"task": op, "check": "number", "expected": c,
                                          "keys": [str(a), str(b)]}


def _string(rng: random.Random) -> Task:
    w = rng.choice(WORDS)
    task = rng.choice(("reverse", "upper", "first_letter", "last_letter"))
    if task == "reverse":
        q = rng.choice((f"Reverse the word '{w}'.", f"Spell '{w}' backwards."))
        exp = w[::-1]
        a = f"The word '{w}' reversed is '{exp}'."
    elif task == "upper":
        q = rng.choice((f"Write '{w}' in capital letters.", f"Make '{w}' upper case."))
        exp = w.upper()
        a = f"The word '{w}' in capital letters is '{exp}'."
    elif task == "first_letter":
        q = f"What is the first letter of '{w}'?"
        exp = w[0]
        a = f"The first letter of '{w}' is '{exp}'."
    else:
        q = f"What is the last letter of '{w}'?"
        exp = w[-1]
        a = f"The last letter of '{w}' is '{exp}'."
    return q, a, {"task": task, "check": "text", "expected": exp, "keys": [w]}


def _counting(rng: random.Random) -> Task:
    task = rng.choice(("letters", "bigger", "smaller", "sort"))
    if task == "letters":
        w = rng.choice(WORDS)
        q = rng.choice((f"How many letters are in the word '{w}'?",
                        f"Count the letters in '{w}'."))
        return q, f"The word '{w}' has {len(w)} letters.", {
            "task": task, "check": "number", "expected": len(w), "keys": [w]}
    if task in ("bigger", "smaller"):
        a, b = rng.sample(range(0, 21), 2)
        m = max(a, b) if task == "bigger" else min(a, b)
        q = f"Which is {task}, {a} or {b}?"
        lo, hi = min(a, b), max(a, b)
        return q, f"Of {lo} and {hi}, the {task} number is {m}.", {
            "task": task, "check": "number", "expected": m, "keys": [str(a), str(b)]}
    nums = rng.sample(range(0, 21), rng.randint(3, 4))
    s = ", ".join(map(str, nums))
    q = rng.choice((f"Sort these numbers from small to big: {s}.", f"Put {s} in order."))
    srt = sorted(nums)
    return q, f"Sorted, the numbers are {', '.join(map(str, srt))}.", {
        "task": task, "check": "sequence", "expected": srt, "keys": [str(n) for n in nums]}


def _facts(rng: random.Random, entities: list[Entity]) -> Task:
    e = rng.choice(entities)
    attr = rng.choice(tuple(ATTRIBUTES))
    q = rng.choice(FACT_QUESTIONS[attr]).format(n=e.name)
    return q, fact_sentence(e.name, attr, e.get(attr)), {
        "task": attr, "check": "fact", "expected": e.get(attr), "keys": [e.name],
        "alternatives": [v for v in ATTRIBUTES[attr] if v != e.get(attr)], "entity": e.name}


_SENTENCES = (
    "I saw the {w} by the road today.", "The {w} is next to the old house.",
    "My friend drew a {w} in the morning.", "We found a small {w} in the garden.",
    "There is a {w} near the river.", "The child looked at the {w} and smiled.",
)
_STARTED = (
    "{s} I walk to the park with my dog.", "{s} we eat bread and soup for lunch.",
    "{s} the sun shines on the hill.", "{s} my cat sleeps by the window.",
)


def _writing(rng: random.Random, entities: list[Entity]) -> Task:
    if rng.random() < 0.6:
        w = rng.choice(NOUNS)
        q = rng.choice((f"Write a sentence with the word '{w}'.",
                        f"Use the word '{w}' in a sentence."))
        return q, rng.choice(_SENTENCES).format(w=w), {
            "task": "contains_word", "check": "contains_word", "expected": w, "keys": [w]}
    s = rng.choice(STARTERS)
    q = f"Write a sentence that starts with the word '{s}'."
    body = rng.choice(_STARTED).format(s=s)
    if s in ("My", "Our"):  # keep it grammatical: "My cat ..." rather than "My I walk ..."
        body = f"{s} {rng.choice(('cat', 'dog', 'friend'))} likes to play in the sun."
    return q, body, {"task": "starts_with", "check": "starts_with", "expected": s, "keys": []}


FAMILIES: tuple[str, ...] = ("arithmetic", "string", "counting", "facts", "writing")


def make_task(family: str, rng: random.Random, entities: list[Entity]) -> Task:
    gens: dict[str, Callable[[], Task]] = {
        "arithmetic": lambda: _arith(rng), "string": lambda: _string(rng),
        "counting": lambda: _counting(rng), "facts": lambda: _facts(rng, entities),
        "writing": lambda: _writing(rng, entities),
    }
    return gens[family]()


def follow_up(family: str, first: Task, rng: random.Random) -> Task | None:
    """A second turn that depends on the first (multi-turn, paper §3.4), or None."""
    q, a, meta = first
    if meta["check"] == "number" and meta["task"] in ("plus", "minus", "times"):
        k = rng.randint(1, 5)
        c = meta["expected"]
        return (f"Now add {k} to that.", f"{c} plus {k} is {c + k}.",
                {"task": "plus", "check": "number", "expected": c + k, "keys": [str(k)]})
    if meta["task"] == "letters":
        w = meta["keys"][0]
        return ("Now spell it backwards.", f"The word '{w}' reversed is '{w[::-1]}'.",
                {"task": "reverse", "check": "text", "expected": w[::-1], "keys": [w]})
    return None


# ---------------------------------------------------------------- corruption (calibration)

_NUM = re.compile(r"-?\d+")


def corrupt_answer(answer: str, meta: dict[str, Any], rng: random.Random) -> str:
    """The gold answer with its checkable part made wrong, keeping the template (a near miss)."""
    check, exp = meta.get("check"), meta.get("expected")
    if check == "number":
        wrong = int(exp) + rng.choice((-3, -2, -1, 1, 2, 3))
        head, sep, tail = answer.rpartition(str(exp))
        return f"{head}{wrong}{tail}" if sep else f"{answer} {wrong}"
    if check == "text":
        s = str(exp)
        if len(s) == 1:
            bad = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != s.lower()])
        else:
            chars = list(s)
            i = rng.randrange(len(chars) - 1)
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
            bad = "".join(chars) if "".join(chars) != s else s[1:] + s[0]
            if bad == s:
                bad = s + s[-1]
        return answer.replace(f"'{s}'.", f"'{bad}'.")
    if check == "sequence":
        seq = list(exp)
        while seq == list(exp):
            rng.shuffle(seq)
        return f"Sorted, the numbers are {', '.join(map(str, seq))}."
    if check == "fact":
        return answer.replace(str(exp), rng.choice(meta["alternatives"]))
    if check == "contains_word":
        return re.sub(rf"\b{re.escape(str(exp))}\b", rng.choice(("thing", "place", "one")),
                      answer)
    if check == "starts_with":
        return "Then " + answer[0].lower() + answer[1:]
    if check == "keywords":
        return "You can just try your best and see what happens."
    return answer
