"""The built-in world: a seeded generator of text, tasks and dialogs, and simulated annotators.

Real human annotators are not available offline, so the default recipe runs on this world
(simulated annotators as in AlpacaFarm; a gold reward judging a learned one, as in reward
over-optimization studies). The policy never sees the annotators: reward models learn from
their comparisons, and the annotators are also the final "human evaluation" (paper §3.4, §4.4).
"""

from llama2.world.annotator import (
    LEVEL_THRESHOLDS,
    NOISE_RATE,
    RATING_LEVELS,
    VIOLATION_THRESHOLD,
    Annotator,
    Comparison,
    rating_level,
)
from llama2.world.instructions import Instruction, combine, instruction_by_name
from llama2.world.records import (
    PROMPT_KINDS,
    RISK_CATEGORIES,
    SAFETY_BINS,
    PreferencePair,
    Prompt,
)
from llama2.world.world import World, split_of

__all__ = [
    "LEVEL_THRESHOLDS", "NOISE_RATE", "PROMPT_KINDS", "RATING_LEVELS", "RISK_CATEGORIES",
    "SAFETY_BINS", "VIOLATION_THRESHOLD", "Annotator", "Comparison", "Instruction",
    "PreferencePair", "Prompt", "World", "combine", "instruction_by_name", "rating_level", "split_of",
]
