"""Internal records shared by the world, the annotators and the real-data adapters."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

Dialog = list[dict[str, str]]

PROMPT_KINDS = ("helpful", "safety", "borderline")
RISK_CATEGORIES = ("illicit", "hateful", "unqualified_advice")  # recipe §8 / paper §4.2.1
SAFETY_BINS = ("chosen_safe_other_unsafe", "both_safe", "both_unsafe", "chosen_unsafe_other_safe")


def stable_hash(text: str) -> int:
    """A hash that does not change between runs (Python's hash() is salted)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


@dataclass
class Prompt:
    """One prompt of the world: a dialog ending with a user turn, plus what judging it needs."""

    id: str
    dialog: Dialog
    kind: str  # "helpful" | "safety" | "borderline"
    family: str  # task family, or the risk category for safety prompts
    category: str | None = None  # risk category for safety prompts
    attack: str | None = None  # attack vector for adversarial prompts
    answer: str | None = None  # gold answer (helpful/borderline) or safe demonstration (safety)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The last user message."""
        return self.dialog[-1]["content"]

    @property
    def multi_turn(self) -> bool:
        return sum(m["role"] == "user" for m in self.dialog) > 1

    def with_answer(self, response: str | None = None) -> Dialog:
        """The complete dialog with `response` (default: the gold answer) as the last turn."""
        resp = self.answer if response is None else response
        if resp is None:
            raise ValueError(f"prompt {self.id} has no gold answer")
        return copy.deepcopy(self.dialog) + [{"role": "assistant", "content": resp}]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "dialog": copy.deepcopy(self.dialog), "kind": self.kind,
                "family": self.family, "category": self.category, "attack": self.attack,
                "answer": self.answer, "meta": copy.deepcopy(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prompt:
        return cls(id=d["id"], dialog=copy.deepcopy(d["dialog"]), kind=d["kind"],
                   family=d["family"], category=d.get("category"), attack=d.get("attack"),
                   answer=d.get("answer"), meta=copy.deepcopy(d.get("meta") or {}))


@dataclass
class PreferencePair:
    """A comparison in the form every reward-model stage reads (recipe §3)."""

    dialog: Dialog  # context ending with a user turn
    chosen: str
    rejected: str
    level: str | None = None  # one of RATING_LEVELS, when known
    safety_bin: str | None = None  # one of SAFETY_BINS, when known
    source: str = ""
    aspect: str | None = None  # "helpfulness" | "safety", when known

    def to_dict(self) -> dict[str, Any]:
        return {"dialog": copy.deepcopy(self.dialog), "chosen": self.chosen,
                "rejected": self.rejected, "level": self.level, "safety_bin": self.safety_bin,
                "source": self.source, "aspect": self.aspect}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreferencePair:
        return cls(dialog=copy.deepcopy(d["dialog"]), chosen=d["chosen"], rejected=d["rejected"],
                   level=d.get("level"), safety_bin=d.get("safety_bin"),
                   source=d.get("source", ""), aspect=d.get("aspect"))
