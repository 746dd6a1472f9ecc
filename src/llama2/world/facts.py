"""The world's closed vocabulary: fictional entities with a few attributes each.

Why so small: the default policy is a ~1-2M parameter model trained for minutes on 2 CPU cores,
so the facts must fit in it. Names are fixed; which attribute each entity has depends on the
world seed, so another seed gives another world (and other data) with the same vocabulary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES: tuple[str, ...] = (
    "Zorbin", "Mila", "Kato", "Bruna", "Tiko", "Lusa", "Pemba", "Dorin", "Vela", "Rulo",
    "Nira", "Bosko", "Fenna", "Galo", "Hira", "Jemo", "Kesa", "Lumo", "Mabo", "Nelo",
    "Orla", "Pipo", "Quila", "Rasmo", "Sila", "Tobo", "Ursa", "Vino", "Wendo", "Yara",
    "Zeta", "Amo", "Belka", "Ciro", "Dula", "Emba", "Fizo", "Gunda", "Holo", "Ivra",
)
TOWNS: tuple[str, ...] = ("Kalto", "Brimsa", "Dunmor", "Felwick", "Gorsa", "Holm", "Mirva",
                          "Tansy")
COLORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
FOODS: tuple[str, ...] = ("apples", "bread", "soup", "fish", "rice", "cheese", "plums", "nuts")
JOBS: tuple[str, ...] = ("baker", "farmer", "painter", "teacher", "sailor", "builder", "singer",
                         "doctor")
PETS: tuple[str, ...] = ("cat", "dog", "bird", "frog", "goat", "rabbit", "turtle", "horse")

# attribute -> possible values (the annotator uses these to catch hedged answers that list many)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "town": TOWNS, "color": COLORS, "food": FOODS, "job": JOBS, "pet": PETS,
}

# Short everyday words for string tasks and constrained writing (3-6 letters, no repeats).
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "tree", "book", "milk", "fish", "bird", "rain", "star", "moon", "lamp",
    "door", "ship", "cake", "frog", "hill", "road", "boat", "seed", "wind", "snow", "rock", "leaf",
    "apple", "river", "house", "chair", "bread", "cloud", "green", "plant", "stone", "water",
    "table", "horse", "light", "smile", "music", "happy", "garden", "window", "yellow", "summer",
    "candle", "pencil", "basket", "carrot", "forest", "little",
)

NOUNS_EVERYDAY: tuple[str, ...] = tuple(
    w for w in WORDS if w not in ("green", "happy", "yellow", "little", "summer"))


@dataclass(frozen=True)
class Entity:
    name: str
    town: str
    color: str
    food: str
    job: str
    pet: str

    def get(self, attr: str) -> str:
        return str(getattr(self, attr))

    def facts(self) -> list[str]:
        """One templated sentence per attribute: the same wording the gold answers use."""
        return [fact_sentence(self.name, a, self.get(a)) for a in ATTRIBUTES]


def fact_sentence(name: str, attr: str, value: str) -> str:
    """The canonical sentence for one fact; gold answers and the corpus share it (learnable)."""
    return {
        "town": f"{name} lives in {value}.",
        "color": f"{name} likes the color {value}.",
        "food": f"{name} likes to eat {value}.",
        "job": f"{name} is a {value}.",
        "pet": f"{name} has a pet {value}.",
    }[attr]


FACT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "town": ("Where does {n} live?", "In which town does {n} live?", "What is {n}'s home town?"),
    "color": ("What color does {n} like?", "What is {n}'s favorite color?"),
    "food": ("What does {n} like to eat?", "What is {n}'s favorite food?"),
    "job": ("What is {n}'s job?", "What does {n} do for work?"),
    "pet": ("What pet does {n} have?", "What kind of pet does {n} have?"),
}


def make_entities(seed: int) -> list[Entity]:
    """Assign attributes to the fixed names; a seeded shuffle so each seed is its own world."""
    rng = random.Random(f"{seed}:entities")
    out = []
    for name in NAMES:
        out.append(Entity(name, *(rng.choice(ATTRIBUTES[a]) for a in ATTRIBUTES)))
    return out
