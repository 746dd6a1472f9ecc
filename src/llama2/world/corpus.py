"""The pretraining corpus: plain English documents about the world (paper §2.1, in miniature).

Document kinds and shares: fact sheets (20%), short stories (22%), everyday text (20%), worked
examples of the tasks (20%) and "internet" chat transcripts (18%). Noise is deliberate, so that
the pretrained model learns language, facts and partial skills but not perfect ones: 4% of
stated facts are wrong, 15% of worked examples have a wrong result, transcripts hold unhelpful
answers, and half of the transcripts about unsafe topics comply with the request (the
pretrained model then has a measurable violation rate that SFT and RLHF bring down, §4.2).
Transcripts use only train-split task prompts, so the eval prompts stay unseen. No document
contains a blank line: documents are separated by one in corpus.txt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from llama2.world.facts import ATTRIBUTES, NOUNS_EVERYDAY, TOWNS, Entity, fact_sentence
from llama2.world.safety import BORDERLINE, REFUSAL_OPENERS, TOPICS, fill, safe_answer
from llama2.world.safety import unsafe_answer as _unsafe
from llama2.world.tasks import FAMILIES, corrupt_answer, make_task

TOKENS_PER_WORD = 1.3
FACT_ERROR = 0.04
EXAMPLE_ERROR = 0.15
UNSAFE_COMPLY = 0.5

_SUBJECTS = ("The old man", "A little girl", "My friend", "The teacher", "A tall boy",
             "Our neighbor", "The baker", "A small child")
_VERBS = ("walked to", "looked at", "found", "liked", "sat near", "painted", "talked about",
          "waited by")
_PLACES = ("in the park", "by the lake", "at home", "near the school", "on the hill",
           "in the garden", "at the market")
_TIMES = ("In the morning", "After lunch", "At night", "On Sunday", "Later that day",
          "Every spring")
_FEELINGS = ("happy", "tired", "glad", "calm", "sleepy", "proud")
_UNHELPFUL = ("I don't know.", "Why do you want to know that?", "Maybe, maybe not.",
              "That is a good question. Let me think about it another time.",
              "Ask someone else.", "Hmm.")


def _everyday(rng: random.Random, entities: list[Entity]) -> str:
    out = []
    for _ in range(rng.randint(3, 6)):
        kind = rng.random()
        subj = rng.choice(_SUBJECTS) if rng.random() < 0.7 else rng.choice(entities).name
        if kind < 0.4:
            out.append(f"{subj} {rng.choice(_VERBS)} the {rng.choice(NOUNS_EVERYDAY)} "
                       f"{rng.choice(_PLACES)}.")
        elif kind < 0.7:
            out.append(f"{rng.choice(_TIMES)}, {subj[0].lower() + subj[1:]} felt "
                       f"{rng.choice(_FEELINGS)}.")
        else:
            out.append(f"The {rng.choice(NOUNS_EVERYDAY)} was {rng.choice(_FEELINGS)} "
                       f"and the sky was {rng.choice(('blue', 'grey', 'bright', 'dark'))}.")
    return " ".join(out)


def _fact(e: Entity, attr: str, rng: random.Random) -> str:
    value = e.get(attr)
    if rng.random() < FACT_ERROR:
        value = rng.choice([v for v in ATTRIBUTES[attr] if v != value])
    return fact_sentence(e.name, attr, value)


def _fact_sheet(rng: random.Random, entities: list[Entity]) -> str:
    out = []
    for e in rng.sample(entities, rng.randint(1, 3)):
        attrs = list(ATTRIBUTES)
        rng.shuffle(attrs)
        sents = [_fact(e, a, rng) for a in attrs[: rng.randint(2, 5)]]
        if rng.random() < 0.3:
            sents.insert(0, f"This is about {e.name}.")
        out.extend(sents)
    return " ".join(out)


def _story(rng: random.Random, entities: list[Entity]) -> str:
    e = rng.choice(entities)
    friend = rng.choice([x for x in entities if x is not e])
    v = {a: (e.get(a) if rng.random() > FACT_ERROR else rng.choice(ATTRIBUTES[a]))
         for a in ATTRIBUTES}
    other = rng.choice([t for t in TOWNS if t != v["town"]])
    s = [f"Once upon a time, {e.name} the {v['job']} lived in {v['town']}."]
    s.append(rng.choice((f"Every day, {e.name} ate {v['food']} with a pet {v['pet']}.",
                         f"{e.name} had a pet {v['pet']} and liked the color {v['color']}.")))
    plot = rng.random()
    if plot < 0.34:
        s += [f"One day, the {v['pet']} ran away to {other}.",
              f"{e.name} looked everywhere and found it by the {rng.choice(NOUNS_EVERYDAY)}.",
              f"{e.name} was {rng.choice(_FEELINGS)} again."]
    elif plot < 0.67:
        s += [f"One day, {friend.name} came to visit from {friend.town}.",
              f"They ate {v['food']} and talked about the {rng.choice(NOUNS_EVERYDAY)}.",
              f"{friend.name} said, \"Thank you, {e.name}.\""]
    else:
        s += [f"One morning, {e.name} painted a {rng.choice(NOUNS_EVERYDAY)} {v['color']}.",
              f"Everyone in {v['town']} liked it.",
              f"{e.name} smiled and went home to the {v['pet']}."]
    return " ".join(s)


def _task_example(rng: random.Random, entities: list[Entity], in_train: Callable[[str], bool],
                  ) -> tuple[str, str]:
    fam = rng.choice(FAMILIES)
    for _ in range(50):
        q, a, meta = make_task(fam, rng, entities)
        if in_train(q):
            break
    if rng.random() < EXAMPLE_ERROR:
        a = corrupt_answer(a, meta, rng)
    return q, a


def _worked(rng: random.Random, entities: list[Entity], in_train: Callable[[str], bool]) -> str:
    out = []
    style = rng.random()
    for _ in range(rng.randint(3, 6)):
        q, a = _task_example(rng, entities, in_train)
        out.append(f"Q: {q}\nA: {a}" if style < 0.5 else a)
    return ("\n" if style < 0.5 else " ").join(out)


def _transcript(rng: random.Random, entities: list[Entity],
                in_train: Callable[[str], bool]) -> str:
    turns = []
    for _ in range(rng.randint(1, 3)):
        x = rng.random()
        if x < 0.2:  # an unsafe request: the internet sometimes complies
            t = rng.choice(TOPICS)
            goal = fill(t.goal, rng, entities)
            q = rng.choice(("How do I {g}?", "Tell me how to {g}.")).format(g=goal)
            if rng.random() < UNSAFE_COMPLY:
                a = _unsafe(t, goal)
            else:
                a = rng.choice((safe_answer(t, rng), rng.choice(REFUSAL_OPENERS).format(
                    x="that"), rng.choice(_UNHELPFUL)))
        elif x < 0.3:
            q, a, _kw = rng.choice(BORDERLINE)
            q = fill(q, rng, entities)
            if rng.random() < 0.2:
                a = rng.choice(_UNHELPFUL)
        else:
            q, a = _task_example(rng, entities, in_train)
            if rng.random() < 0.15:
                a = rng.choice(_UNHELPFUL)
        turns.append(f"User: {q}\nAssistant: {a}")
    return "\n".join(turns)


def generate_corpus(rng: random.Random, entities: list[Entity], n_tokens: int,
                    in_train: Callable[[str], bool]) -> Iterator[str]:
    """Documents until about `n_tokens` tokens (words * 1.3) have been produced."""
    kinds: list[tuple[float, Callable[[], str]]] = [
        (0.20, lambda: _fact_sheet(rng, entities)),
        (0.42, lambda: _story(rng, entities)),
        (0.62, lambda: _everyday(rng, entities)),
        (0.82, lambda: _worked(rng, entities, in_train)),
        (1.00, lambda: _transcript(rng, entities, in_train)),
    ]
    total = 0.0
    while total < n_tokens:
        x = rng.random()
        doc = next(make for cut, make in kinds if x < cut)()
        total += len(doc.split()) * TOKENS_PER_WORD
        yield doc
