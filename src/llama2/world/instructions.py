"""Persistent system instructions for Ghost Attention (paper §3.3, recipe §7).

Families as in the paper: act as a figure, speak in a style or language, enjoy a hobby, plus
answer formats. Each instruction has a verbose and a terse phrasing ("Figure: wizard"; the
paper uses terse forms half the time), a checker that says whether a response obeys it, and
`apply(answer)` that turns a plain answer into an obeying one (the GAtt training targets).
Checkers are deliberately simple and robust (word-level, case-insensitive) so that adherence
over 20 turns (Table 30) can be measured without a judge model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


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
