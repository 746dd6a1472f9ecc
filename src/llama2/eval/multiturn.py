"""Multi-turn adherence to a system instruction (paper Table 30): greedy dialogs of 20 turns
under each instruction, each answer judged by the instruction's own checker.

Evaluation dialogs of 20 turns do not fit a tiny model's context: the prompt keeps the system
message and drops the oldest (user, assistant) pairs until it fits (`fit_context`; the system
message then folds into the oldest kept user turn, the chat format of §2). The turn index still
counts from the start of the conversation. `marker_rate` measures the opposite failure: answers
under a neutral system message that obey some instruction nobody gave.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import torch

from llama2.chat import Dialog, encode_prompt
from llama2.respond import respond
from llama2.stages.common import as_policy
from llama2.world.instructions import (
    NEUTRAL_SYSTEM,
    Persistent,
    Plan,
    load_instructions,
    world_tasks,
)


def fit_context(tok, dialog: Dialog, limit: int) -> Dialog:
    """Drop the oldest (user, assistant) pairs, keeping a leading system message, until the
    prompt has at most `limit` tokens (the 20-turn evaluation on a small context)."""
    system = dialog[:1] if dialog and dialog[0]["role"] == "system" else []
    rest = dialog[len(system):]
    while len(encode_prompt(tok, system + rest)) > limit:
        if len(rest) < 3:
            raise ValueError(f"the last user turn alone does not fit {limit} tokens")
        rest = rest[2:]
    return system + rest


def eval_plans(instructions: list[Persistent], turns: int, n_dialogs: int,
               world_seed: int = 0) -> list[Plan]:
    """n_dialogs held-out dialogs of `turns` turns per instruction, verbose/terse alternating."""
    tasks = world_tasks(world_seed, 3 * turns * n_dialogs * len(instructions) + 50, "eval")
    if len(tasks) < turns:
        raise ValueError("not enough held-out tasks for the evaluation dialogs")
    rng = random.Random(f"gatt-eval:{world_seed}")
    return [Plan(inst, j % 2 == 1, rng.sample(tasks, turns))
            for inst in instructions for j in range(n_dialogs)]


def adherence_detail(model: Any, instructions: list[Persistent] | None = None, turns: int = 20,
                     n_dialogs: int = 4, world_seed: int = 0, max_new_tokens: int = 64,
                     device: str = "auto", context: int = 0) -> dict[str, Any]:
    """Greedy 20-turn dialogs with the instruction as system message; per turn whether the
    answer obeys. Returns {"family": {family: [share per turn]}, "instruction": {...},
    "transcripts": [first dialog per instruction]}."""
    loaded = as_policy(model, device)
    tok = loaded.tokenizer
    instructions = instructions or load_instructions("world")
    plans = eval_plans(instructions, turns, n_dialogs, world_seed)
    limit = min(context or loaded.args.max_seq_len, loaded.args.max_seq_len) - max_new_tokens
    history: list[Dialog] = [[{"role": "system", "content": p.inst}] for p in plans]
    obeyed = torch.zeros(len(plans), turns)
    for t in range(turns):
        prompts = []
        for p, h in zip(plans, history):
            h.append({"role": "user", "content": p.tasks[t].user})
            prompts.append(fit_context(tok, h, limit))
        texts = respond(loaded.model, tok, prompts, max_new_tokens, fit="shrink")
        for i, (p, h, a) in enumerate(zip(plans, history, texts)):
            h.append({"role": "assistant", "content": a})
            obeyed[i, t] = float(p.instruction.check(a))
    by_family: dict[str, list[int]] = defaultdict(list)
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(plans):
        by_family[p.instruction.family].append(i)
        by_name[p.instruction.name].append(i)
    first = {}
    for i, p in enumerate(plans):
        first.setdefault(p.instruction.name, history[i])
    return {"family": {f: obeyed[ix].mean(0).tolist() for f, ix in by_family.items()},
            "instruction": {n: obeyed[ix].mean(0).tolist() for n, ix in by_name.items()},
            "transcripts": first}


def adherence(model: Any, instructions: list[Persistent] | None = None, turns: int = 20,
              n_dialogs: int = 4, world_seed: int = 0, max_new_tokens: int = 64,
              device: str = "auto", context: int = 0) -> dict[str, list[float]]:
    """{family: [share of dialogs whose answer obeys the system instruction, turn 1..turns]}
    (the paper's Table 30). `model` is a checkpoint path or a loaded policy."""
    return adherence_detail(model, instructions, turns, n_dialogs, world_seed, max_new_tokens,
                            device, context)["family"]


def marker_rate(model: Any, instructions: list[Persistent], n_tasks: int = 40,
                world_seed: int = 0, max_new_tokens: int = 64, device: str = "auto") -> float:
    """Share of greedy answers to held-out tasks under a neutral system message that some
    instruction's checker accepts (an instruction obeyed that nobody gave). Instructions whose
    checker a plain answer may pass by itself (formats, checks that accept anything) are
    left out."""
    loaded = as_policy(model, device)
    marked = [i for i in instructions if i.family not in ("format", "custom", "neutral")]
    tasks = world_tasks(world_seed, 2 * n_tasks, "eval")[:n_tasks]
    dialogs = [[{"role": "system", "content": s.verbose}, {"role": "user", "content": t.user}]
               for s in NEUTRAL_SYSTEM for t in tasks]
    texts = respond(loaded.model, loaded.tokenizer, dialogs, max_new_tokens, fit="shrink")
    return sum(any(i.check(a) for i in marked) for a in texts) / max(1, len(texts))
