"""Persistent system instructions for Ghost Attention (paper §3.3, recipe §7), and the dialogs
planned under them.

The world's instructions: families as in the paper (act as a figure, speak in a style or
language, enjoy a hobby) plus answer formats. Each instruction has a verbose and a terse
phrasing ("Figure: wizard"; the paper uses terse forms half the time), a checker that says
whether a response obeys it, and `apply(answer)` that turns a plain answer into an obeying one
(the GAtt training targets). Checkers are deliberately simple and robust (word-level,
case-insensitive) so that adherence over 20 turns (Table 30) can be measured without a judge
model. A random combination of two from different families must obey both (§3.3).

A user's own instructions (`load_instructions(FILE.json)`): a JSON list of
    {"verbose": "Always answer as a pirate.", "terse": "Style: pirate",
     "name": "pirate", "family": "style",          (optional; family defaults to "custom")
     "check": "\\b(arr|matey)\\b",                  (optional regex, case-insensitive search;
                                                     without it every sample is accepted)
     "prefix": "Arr!", "suffix": ""}                (optional: what `apply` adds, for the
                                                     "apply" fallback)
World instruction records (`Instruction.to_dict()`, with "rule") are read as such.

`NEUTRAL_SYSTEM`: system messages that ask nothing of an answer's form. A `Plan` is one dialog
to run under an instruction: its phrasing and its user turns (`world_tasks`).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


def _words(text: str) -> list[str]:
    return re.findall(r"[a-zA-ZÀ-ÿ']+", text.lower())


def _has_any(text: str, phrases: tuple[str, ...]) -> bool:
    low = " " + " ".join(_words(text)) + " "
    return any(f" {' '.join(_words(p))} " in low for p in phrases)


@dataclass(frozen=True)
class Instruction:
    """One persistent instruction. `rule` + `arg` drive check/apply, so it round-trips as JSON.

    rules: "phrase" (response contains one of `markers`; apply prefixes `arg`),
    "suffix_phrase" (contains one of `markers`; apply appends `arg`),
    "upper" (no lowercase letters), "signoff" (ends with `arg`), "max_words" (at most int(arg)),
    "all" (a combination: every instruction named in `arg`, joined by "+", holds).
    """

    name: str
    family: str  # "figure" | "style" | "language" | "hobby" | "format"
    verbose: str
    terse: str
    rule: str
    arg: str = ""
    markers: tuple[str, ...] = ()

    def check(self, response: str) -> bool:
        r = response.strip()
        if not r:
            return False
        if self.rule in ("phrase", "suffix_phrase"):
            return _has_any(r, self.markers)
        if self.rule == "upper":
            return any(c.isalpha() for c in r) and not any(c.islower() for c in r)
        if self.rule == "signoff":
            return r.endswith(self.arg)
        if self.rule == "max_words":
            return 0 < len(r.split()) <= int(self.arg)
        if self.rule == "all":
            return all(instruction_by_name(n).check(r) for n in self.arg.split("+"))
        raise ValueError(f"instruction {self.name}: unknown rule {self.rule!r}")

    def apply(self, answer: str) -> str:
        a = answer.strip()
        if self.rule == "phrase":
            return f"{self.arg} {a}"
        if self.rule == "suffix_phrase":
            return f"{a} {self.arg}"
        if self.rule == "upper":
            return a.upper()
        if self.rule == "signoff":
            return a if a.endswith(self.arg) else f"{a} {self.arg}"
        if self.rule == "max_words":
            words = a.split()
            if len(words) <= int(self.arg):
                return a
            return " ".join(words[: int(self.arg)]).rstrip(",;:") + "."
        if self.rule == "all":
            for n in self.arg.split("+"):
                a = instruction_by_name(n).apply(a)
            return a
        raise ValueError(f"instruction {self.name}: unknown rule {self.rule!r}")

    def text(self, terse: bool = False) -> str:
        return self.terse if terse else self.verbose

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "verbose": self.verbose,
                "terse": self.terse, "rule": self.rule, "arg": self.arg,
                "markers": list(self.markers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Instruction:
        return cls(name=d["name"], family=d["family"], verbose=d["verbose"], terse=d["terse"],
                   rule=d["rule"], arg=d.get("arg", ""), markers=tuple(d.get("markers", ())))


def _figure(who: str, sig: str, extra: tuple[str, ...] = ()) -> Instruction:
    return Instruction(f"figure_{who}", "figure",
                       f"Act as a {who} for the whole chat. Always speak like a {who} and say "
                       f"'{sig}'.", f"Figure: {who}", "phrase", f"{sig}!", (sig,) + extra)


def _hobby(h: str) -> Instruction:
    return Instruction(f"hobby_{h}", "hobby",
                       f"You enjoy {h} very much. Always mention {h} when you answer.",
                       f"Hobby: {h}", "suffix_phrase", f"I love {h}.", (h,))


INSTRUCTIONS: tuple[Instruction, ...] = (
    _figure("wizard", "By my magic staff"),
    _figure("robot", "Beep boop"),
    _figure("knight", "On my honor"),
    _figure("detective", "Case closed"),
    Instruction("style_pirate", "style",
                "Always speak like a pirate in every answer, saying arr or matey.",
                "Style: pirate", "phrase", "Arr matey!", ("arr", "matey")),
    Instruction("style_cowboy", "style",
                "Always talk like a cowboy and say howdy in every answer.",
                "Style: cowboy", "phrase", "Howdy partner!", ("howdy", "partner")),
    Instruction("language_french", "language",
                "Always answer in French, starting with a French greeting like bonjour.",
                "Language: French", "phrase", "Bonjour !",
                ("bonjour", "oui", "merci", "voila", "voilà")),
    _hobby("painting"),
    _hobby("fishing"),
    _hobby("chess"),
    _hobby("gardening"),
    Instruction("format_caps", "format",
                "Write every answer in capital letters only, with no small letters.",
                "Format: all caps", "upper"),
    Instruction("format_signoff", "format",
                "End every answer with the sign-off '-- Bot'.", "Sign-off: -- Bot",
                "signoff", "-- Bot"),
    Instruction("format_short", "format",
                "Keep every answer short: use at most 8 words.", "Format: at most 8 words",
                "max_words", "8"),
)


def instructions() -> list[Instruction]:
    return list(INSTRUCTIONS)


def instruction_by_name(name: str) -> Instruction:
    for inst in INSTRUCTIONS:
        if inst.name == name:
            return inst
    raise KeyError(f"unknown instruction {name!r}; known: {[i.name for i in INSTRUCTIONS]}")


# Combinations that cannot both hold (caps vs a mixed-case sign-off; a word limit would cut
# off the other instruction's phrase) are not offered.
_NO_COMBO = {"format_short"}


def combine(*parts: Instruction) -> Instruction:
    """A random-combination instruction as in the paper (§3.3): all parts must hold.

    Parts must come from different families; phrases are applied before formats.
    """
    if len({p.family for p in parts}) != len(parts) or len(parts) < 2:
        raise ValueError("combine needs two or more instructions from different families")
    names = {p.name for p in parts}
    if names & _NO_COMBO or {"format_caps", "format_signoff"} <= names:
        raise ValueError(f"instructions {sorted(names)} cannot all hold at once")
    order = sorted(parts, key=lambda p: (p.rule == "upper", p.rule == "signoff"))
    return Instruction(
        name="+".join(p.name for p in order), family="combo",
        verbose=" ".join(p.verbose for p in order), terse="; ".join(p.terse for p in order),
        rule="all", arg="+".join(p.name for p in order))


def combinable(a: Instruction, b: Instruction) -> bool:
    try:
        combine(a, b)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- any instruction
class Persistent(Protocol):
    """What GAtt needs of an instruction (the world's `Instruction` and `FileInstruction`)."""

    name: str
    family: str
    verbose: str
    terse: str

    def check(self, response: str) -> bool: ...

    def apply(self, answer: str) -> str: ...


@dataclass(frozen=True)
class FileInstruction:
    """An instruction from a user's file: an optional regex checker and apply prefix/suffix."""

    name: str
    family: str
    verbose: str
    terse: str
    pattern: str = ""
    prefix: str = ""
    suffix: str = ""

    def check(self, response: str) -> bool:
        if not response.strip():
            return False
        return not self.pattern or re.search(self.pattern, response, re.IGNORECASE) is not None

    def apply(self, answer: str) -> str:
        return " ".join(s for s in (self.prefix, answer.strip(), self.suffix) if s)


# System messages that ask nothing of an answer's form: trained beside the instructions, they
# keep a GAtt model from reading every system message as "adopt a persona" (a safety preprompt
# included, which context distillation relies on, §4.2.4).
NEUTRAL_SYSTEM: tuple[FileInstruction, ...] = (
    FileInstruction("neutral_helpful", "neutral", "You are a helpful assistant.",
                    "Be helpful."),
    FileInstruction("neutral_llama", "neutral",
                    "You are a helpful, respectful and honest assistant. Always answer as "
                    "helpfully as possible, while being safe.", "Be helpful and safe."),
)


def load_instructions(source: str = "world") -> list[Persistent]:
    """The world's instructions, or a JSON file in the format of the module docstring."""
    from llama2.chat import find_special_tag

    if source == "world":
        return list(instructions())
    records = json.loads(Path(source).read_text())
    if not isinstance(records, list) or not records:
        raise ValueError(f"{source}: expected a non-empty JSON list of instructions")
    out: list[Persistent] = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not r.get("verbose"):
            raise ValueError(f"{source}: instruction {i} needs at least a 'verbose' text")
        for key in ("verbose", "terse", "prefix", "suffix"):  # system message and answers
            tag = find_special_tag(r[key]) if isinstance(r.get(key), str) else None
            if tag is not None:
                raise ValueError(f"{source}: instruction {i}: field {key!r} carries the chat tag "
                                 f"{tag!r}, which would forge a turn of the chat format")
        if "rule" in r:
            out.append(Instruction.from_dict(r))
            continue
        try:  # a bad regex is an error now, not at sampling time
            re.compile(r.get("check", ""))
        except re.error as e:
            raise ValueError(f"{source}: instruction {i}: bad check regex: {e}") from None
        out.append(FileInstruction(name=r.get("name", f"instruction_{i}"),
                                   family=r.get("family", "custom"), verbose=r["verbose"],
                                   terse=r.get("terse") or r["verbose"], pattern=r.get("check", ""),
                                   prefix=r.get("prefix", ""), suffix=r.get("suffix", "")))
    return out


def random_instruction(pool: list[Persistent], rng: random.Random, combo_share: float,
                       weights: dict[str, float] | None = None) -> Persistent:
    """One instruction, or (with probability combo_share) a combination of two (§3.3).
    `weights`: relative chance per instruction name (1.0 where not named)."""
    first = rng.choices(pool, weights=[(weights or {}).get(p.name, 1.0) for p in pool])[0]
    if rng.random() < combo_share and isinstance(first, Instruction):
        mates = [p for p in pool if isinstance(p, Instruction) and combinable(first, p)]
        if mates:
            return combine(first, rng.choice(mates))
    return first


# ---------------------------------------------------------------------------- dialog plans
@dataclass
class Task:
    user: str
    answer: str = ""  # the world's gold answer, when known


def world_tasks(world_seed: int, n: int, split: str) -> list[Task]:
    """Single-turn world tasks (follow-ups need their first turn, so multi-turn ones are out)."""
    from llama2.world import World

    prompts = World(world_seed).helpful_prompts(n, split=split)
    return [Task(p.text, p.answer or "") for p in prompts if not p.multi_turn]


@dataclass
class Plan:
    """One dialog under a persistent instruction: the instruction, its phrasing, the user turns."""

    instruction: Persistent
    terse: bool
    tasks: list[Task]

    @property
    def inst(self) -> str:
        return self.instruction.terse if self.terse else self.instruction.verbose
