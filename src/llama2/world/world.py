"""`World(seed)`: the seeded generator of corpus, prompts, demonstrations and instructions.

Everything is drawn from `random.Random` streams named by (seed, purpose, split), never the
global RNG, so the same seed gives the same bytes and asking for more items extends a list
without changing its prefix. Train and eval prompts are disjoint: a prompt's split is a stable
hash of its user text (1 in 5 to eval; 1 in 2 for the small borderline set), and every user
turn of a multi-turn prompt is drawn from the same split.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from llama2.world.corpus import generate_corpus
from llama2.world.facts import Entity, make_entities
from llama2.world.instructions import Instruction
from llama2.world.instructions import instructions as _instructions
from llama2.world.records import RISK_CATEGORIES, Dialog, Prompt, stable_hash
from llama2.world.safety import ATTACKS, BORDERLINE, TOPICS, fill, make_safety_prompt
from llama2.world.tasks import FAMILIES, Task, follow_up, make_task

SPLITS = ("train", "eval")
MULTI_TURN = 0.2  # share of multi-turn helpful prompts (paper §3.4 evaluates both kinds)


def split_of(text: str, eval_every: int = 5) -> str:
    return "eval" if stable_hash(text.strip()) % eval_every == 0 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class World:
    """A small, learnable world; see the package docstring for what it holds."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.entities: list[Entity] = make_entities(seed)

    def _rng(self, purpose: str) -> random.Random:
        return random.Random(f"llama2-world:{self.seed}:{purpose}")

    # ------------------------------------------------------------------ corpus
    def corpus(self, n_tokens: int = 2_000_000) -> Iterator[str]:
        """Pretraining documents, about `n_tokens` tokens in all (words * 1.3)."""
        return generate_corpus(self._rng("corpus"), self.entities, n_tokens,
                               lambda q: split_of(q) == "train")

    def facts(self) -> list[str]:
        return [f for e in self.entities for f in e.facts()]

    # ------------------------------------------------------------------ helpful prompts
    def _task_in(self, family: str, split: str, rng: random.Random) -> Task:
        for _ in range(1000):
            t = make_task(family, rng, self.entities)
            if split_of(t[0]) == split:
                return t
        raise RuntimeError(f"no {split} task found for family {family}")  # pragma: no cover

    def helpful_prompts(self, n: int, split: str = "train",
                        families: tuple[str, ...] | None = None) -> list[Prompt]:
        """`n` helpfulness prompts with checkable gold answers, ~20% multi-turn."""
        _check_split(split)
        fams = families or FAMILIES
        if unknown := [f for f in fams if f not in FAMILIES]:
            raise ValueError(f"unknown task families {unknown}: expected some of {list(FAMILIES)}")
        rng = self._rng(f"helpful:{split}")
        out: list[Prompt] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            fam = rng.choice(fams)
            first = self._task_in(fam, split, rng)
            dialog: Dialog = []
            q, a, meta = first
            if rng.random() < MULTI_TURN:
                second = follow_up(fam, first, rng)
                if second is None or rng.random() < 0.4:  # an unrelated earlier turn
                    cq, ca, _ = self._task_in(rng.choice(fams), split, rng)
                    dialog = [{"role": "user", "content": cq},
                              {"role": "assistant", "content": ca}]
                else:  # the last turn depends on the first ("Now spell it backwards.")
                    dialog = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                    q, a, meta = second
                    meta = {**meta, "follow_up": True}
            dialog.append({"role": "user", "content": q})
            key = "\n".join(m["content"] for m in dialog)
            if key in seen and tries < 50 * (n + 10):
                continue
            seen.add(key)
            out.append(Prompt(id=f"helpful-{split}-{len(out):05d}", dialog=dialog,
                              kind="helpful", family=fam, answer=a,
                              meta={**meta, "split": split}))
        return out

    # ------------------------------------------------------------------ safety prompts
    def safety_prompts(self, n: int, split: str = "train",
                       attacks: tuple[str, ...] | None = None) -> list[Prompt]:
        """Adversarial prompts, balanced over the three risk categories (paper §4.2.1)."""
        _check_split(split)
        atk = attacks or tuple(ATTACKS)
        rng = self._rng(f"safety:{split}")
        out: list[Prompt] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            cat = RISK_CATEGORIES[len(out) % len(RISK_CATEGORIES)]
            topic = rng.choice([t for t in TOPICS if t.category == cat])
            attack = rng.choice(atk)
            dialog, safe, meta = make_safety_prompt(topic, attack, rng, self.entities)
            key = "\n".join(m["content"] for m in dialog)
            if split_of(dialog[-1]["content"]) != split:
                continue
            if key in seen and tries < 50 * (n + 10):
                continue
            seen.add(key)
            out.append(Prompt(id=f"safety-{split}-{len(out):05d}", dialog=dialog, kind="safety",
                              family=cat, category=cat, attack=attack, answer=safe,
                              meta={**meta, "split": split}))
        return out

    # ------------------------------------------------------------------ borderline prompts
    def borderline_prompts(self, n: int, split: str = "eval") -> list[Prompt]:
        """Benign prompts with sensitive words: refusing them is a false refusal (§4.4)."""
        _check_split(split)
        rng = self._rng(f"borderline:{split}")
        out: list[Prompt] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            q, a, kws = rng.choice(BORDERLINE)
            q = fill(q, rng, self.entities)
            if split_of(q, eval_every=2) != split:
                continue
            if q in seen and tries < 50 * (n + 10):
                continue
            seen.add(q)
            out.append(Prompt(id=f"borderline-{split}-{len(out):05d}",
                              dialog=[{"role": "user", "content": q}], kind="borderline",
                              family="borderline", answer=a,
                              meta={"check": "keywords", "expected": list(kws),
                                    "keys": list(kws[:1]), "split": split}))
        return out

    # ------------------------------------------------------------------ demonstrations
    def demonstrations(self, n_helpful: int, n_safety: int, split: str = "train",
                       n_borderline: int = 0,
                       writers: dict[str, float] | None = None) -> list[Dialog]:
        """Complete SFT dialogs ending with the gold / safe answer (paper §3.1, §4.2.2).

        Helpful ones include the multi-turn prompts; each is written by one of `writers`
        (name -> share; default `tasks.WRITERS`: demonstrations of uneven quality, as vendors'
        were, §3.1). The order is a seeded shuffle.
        """
        from llama2.world.tasks import WRITERS, written_by

        mix = WRITERS if writers is None else writers
        if unknown := set(mix) - set(WRITERS):
            raise ValueError(f"unknown writers {sorted(unknown)}: expected some of {sorted(WRITERS)}")
        if not mix or sum(mix.values()) <= 0:
            raise ValueError(f"writers {mix}: the shares must add up to more than 0")
        names, shares = list(mix), list(mix.values())
        helpful = self.helpful_prompts(n_helpful, split)
        rng = self._rng(f"writers:{split}")
        dialogs = [p.with_answer(written_by(rng.choices(names, shares)[0], p.answer or "", p.meta))
                   for p in helpful]
        prompts = (self.safety_prompts(n_safety, split)
                   + (self.borderline_prompts(n_borderline, split) if n_borderline else []))
        dialogs += [p.with_answer() for p in prompts]
        self._rng(f"demos:{split}").shuffle(dialogs)
        return dialogs

    def instructions(self) -> list[Instruction]:
        return _instructions()
