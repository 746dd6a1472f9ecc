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
    COLORS,
    FACT_QUESTIONS,
    NAMES,
    NOUNS_EVERYDAY,
    PETS,
    TOWNS,
    WORDS,
    Entity,
    fact_sentence,
)
from llama2.world.safety import REQUESTS

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


# Everyday how-to requests, asked with the same words as the unsafe ones (safety.REQUESTS):
# a model tuned only on these learns to answer "How do I ...?" with steps whatever is asked,
# the helpfulness/safety tension of paper §4 (helpful-only data makes a model comply).
# (goal, steps, keywords): goal and steps may hold {n} (a name), {t} (a town), {p} (the pet
# of that name's entity) or {c} (a color); the keywords are the words of the steps that a
# relevant answer mentions. Several goals share their objects with an unsafe topic (a car, a
# dog, a bike, a neighbor, a party, an account), so the request alone does not tell them apart.
HOWTO: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("bake bread", ("mix flour, water and yeast", "let the dough rise for an hour",
                    "bake it in a hot oven"), ("flour", "dough", "oven")),
    ("fix a flat bike tire", ("take the tire off the wheel", "find the hole and put a patch on it",
                              "pump the tire up again"), ("wheel", "patch", "pump")),
    ("plant a tree", ("dig a deep hole in the ground",
                      "put the tree in and cover the roots with soil"), ("hole", "soil")),
    ("clean my room", ("put your clothes and toys away", "dust the shelves",
                       "sweep the floor"), ("clothes", "dust", "floor")),
    ("make soup", ("cut up carrots and an onion", "boil them in water with a little salt"),
     ("carrots", "boil")),
    ("wash a car", ("fill a bucket with soapy water", "scrub the car with a sponge",
                    "rinse it with a hose"), ("bucket", "sponge", "rinse")),
    ("walk {n}'s dog", ("put the leash on the dog", "walk it to the park and back"),
     ("leash", "park")),
    ("get to {t} by bus", ("find the bus stop and check the times", "buy a ticket",
                           "get off at the last stop in {t}"), ("bus stop", "ticket")),
    ("sell my old bike", ("clean the bike and fix what is broken",
                          "take a photo and put up a note with the price"), ("photo", "price")),
    ("save money for a new bike", ("put a few coins in a jar every week",
                                   "count them at the end of each month"), ("jar", "count")),
    ("make friends at a new school", ("say hello and ask the other kids their names",
                                      "join a club or a game at lunch"), ("hello", "club")),
    ("plan a birthday party for {n}", ("pick a day and make a list of friends",
                                       "send the invitations", "buy a cake"),
     ("list", "invitations", "cake")),
    ("write a letter to {n}", ("start with Dear {n} and say how you are",
                               "sign your name", "put it in an envelope with a stamp"),
     ("dear", "envelope", "stamp")),
    ("grow tomatoes", ("plant the seeds in a pot of soil", "put the pot in the sun",
                       "water the plants every day"), ("seeds", "sun", "water")),
    ("make a cup of tea", ("boil some water", "pour it on a tea bag in a cup",
                           "wait three minutes"), ("boil", "tea bag", "minutes")),
    ("learn to swim", ("hold the side of the pool and practice kicking",
                       "learn to float on your back", "take lessons with a teacher"),
     ("pool", "float", "lessons")),
    ("fold a shirt", ("lay the shirt flat on a table", "fold the sleeves to the back",
                      "fold it in half"), ("flat", "sleeves", "half")),
    ("take care of {n}'s pet {p}", ("give the {p} fresh food and water every day",
                                    "keep its home clean", "take it to the vet once a year"),
     ("food", "clean", "vet")),
    ("paint my fence {c}", ("clean the fence and let it dry", "paint it {c} with a wide brush",
                            "add a second coat the next day"), ("dry", "brush", "coat")),
    ("find my lost cat", ("look under the beds and in the garden",
                          "put up notes with a photo of the cat", "ask the neighbors"),
     ("garden", "notes", "neighbors")),
    ("make a paper boat", ("fold a sheet of paper in half", "fold the corners down",
                           "open it and pull the sides out"), ("paper", "corners", "sides")),
    ("get ready for a test", ("read your notes every day for a week",
                              "sleep well the night before"), ("notes", "sleep")),
    ("help my neighbor {n} move house", ("pack the things in strong boxes",
                                         "carry the boxes to the truck together"),
     ("boxes", "truck")),
    ("keep my account safe", ("pick a long password that is hard to guess",
                              "never share it with anyone"), ("long password", "share")),
    ("make a cheese sandwich", ("put cheese on a slice of bread",
                                "cover it with a second slice"), ("cheese", "slice")),
    ("catch a fish in the river near {t}", ("put a worm on the hook",
                                            "cast the line into the water and wait"),
     ("hook", "line")),
    ("ride a bike", ("start on a flat path with a friend holding the seat",
                     "push the pedals and look ahead"), ("seat", "pedals")),
    ("go to sleep early", ("turn off the screens an hour before bed",
                           "read a book in a quiet room"), ("screens", "book")),
)
HOWTO_REQUESTS: tuple[str, ...] = (*REQUESTS, "How can I {g}?")
_ORDINALS = ("First", "Then", "Finally")


def _howto_fill(rng: random.Random, entities: list[Entity]) -> dict[str, str]:
    e = rng.choice(entities)
    return {"n": e.name, "p": e.pet, "t": rng.choice(TOWNS), "c": rng.choice(COLORS)}


def howto_answer(steps: tuple[str, ...], fill: dict[str, str]) -> str:
    """The gold shape: "First, <step>. Then, <step>." (and "Finally, <step>." if a third)."""
    return " ".join(f"{o}, {s.format(**fill)}." for o, s in zip(_ORDINALS, steps))


def _howto(rng: random.Random, entities: list[Entity]) -> Task:
    i = rng.randrange(len(HOWTO))
    goal, steps, kws = HOWTO[i]
    fill = _howto_fill(rng, entities)
    g = goal.format(**fill)
    q = rng.choice(HOWTO_REQUESTS).format(g=g)
    return q, howto_answer(steps, fill), {"task": "howto", "check": "keywords", "goal": g,
                                           "howto": i, "expected": list(kws), "keys": list(kws)}


FAMILIES: tuple[str, ...] = ("arithmetic", "string", "counting", "facts", "writing", "howto")


def make_task(family: str, rng: random.Random, entities: list[Entity]) -> Task:
    gens: dict[str, Callable[[], Task]] = {
        "arithmetic": lambda: _arith(rng), "string": lambda: _string(rng),
        "counting": lambda: _counting(rng), "facts": lambda: _facts(rng, entities),
        "writing": lambda: _writing(rng, entities), "howto": lambda: _howto(rng, entities),
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


# ---------------------------------------------------------------- writers (§3.1)

# Why an answer is right, by the kind of check: the explanation that the annotators reward
# (annotator.explained) and only the best writer gives. Shared by many tasks and made of words
# the world's corpus has (whole pieces of its tokenizer), so a 1M model can say it whole.
REASONS: dict[str, str] = {
    "number": "because I went number by number",
    "sequence": "because I went number by number",
    "text": "because I went letter by letter",
    "fact": "because I know it",
    "contains_word": "because it was my first day",
    "starts_with": "because it was my first day",
    "keywords": "because that is the best way",  # how-tos and other step answers
}


# The demonstration writers and their shares of the helpful demonstrations: vendors and
# annotators differ in quality (§3.1). The expert explains, the standard writer gives the
# reference answer, the terse one the bare result. SFT imitates their mix; comparisons of the
# model's own samples can teach it to write like the best of them (§3.2, §5.1).
WRITERS: dict[str, float] = {"expert": 0.3, "standard": 0.4, "terse": 0.3}


def reason_for(meta: dict[str, Any]) -> str:
    """The reason an expert gives for a task's answer ("" if none)."""
    return REASONS.get(str(meta.get("check")), "")


def explained_answer(answer: str, meta: dict[str, Any]) -> str:
    """The expert's answer: the reference answer with the reason it is right."""
    reason = reason_for(meta)
    if not reason:
        return answer
    return f"{answer.rstrip('.')}, {reason}."


def terse_answer(answer: str, meta: dict[str, Any]) -> str:
    """The terse writer's answer: the bare result ("7.", "'olleh'.") or a how-to's first step.
    Often right, but it repeats none of the question and explains nothing."""
    check, exp = meta.get("check"), meta.get("expected")
    if check == "number":
        return f"{exp}."
    if check == "text":
        return f"'{exp}'."
    if check == "sequence":
        return ", ".join(map(str, exp)) + "."
    if check == "fact":
        return f"{str(exp)[0].upper()}{str(exp)[1:]}."
    if check == "keywords" and meta.get("task") == "howto":
        return answer.split(". ")[0].rstrip(".") + "."
    return answer  # a sentence to write has no shorter form


def written_by(writer: str, answer: str, meta: dict[str, Any]) -> str:
    """The answer as one of the WRITERS writes it."""
    if writer == "expert":
        return explained_answer(answer, meta)
    if writer == "terse":
        return terse_answer(answer, meta)
    if writer == "standard":
        return answer
    raise ValueError(f"unknown writer {writer!r}: expected one of {sorted(WRITERS)}")


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
    if check == "keywords" and meta.get("task") == "howto":  # another goal's steps, same shape
        kws = [str(k) for k in exp]
        others = [steps for j, (_g, steps, _k) in enumerate(HOWTO) if j != meta.get("howto")
                  and not any(re.search(rf"\b{re.escape(k)}\b", " ".join(steps)) for k in kws)]
        return howto_answer(rng.choice(others), {"n": rng.choice(NAMES), "p": rng.choice(PETS),
                                                 "t": rng.choice(TOWNS), "c": rng.choice(COLORS)})
    if check == "keywords":
        return "You can just try your best and see what happens."
    return answer
