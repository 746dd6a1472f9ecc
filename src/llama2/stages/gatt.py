"""Ghost Attention, GAtt (recipe §7, paper §3.3), its adherence evaluation (Table 30) and the
attention-on-the-system-message measurement (Figure 10).

Data (paper §3.3): multi-turn dialogs [u1, a1, ..., un, an] and a persistent instruction
`inst` (act as a figure, a style or language, a hobby, an answer format, or a random
combination of two; verbose or terse phrasing, "Figure: wizard", half the time). `inst` is
appended to every user turn and the assistant turns are sampled from the latest policy. For
training, `inst` is kept only as the system message of the first turn and the loss is zeroed on
every token of the earlier turns, assistant turns included: only the last turn is learned
(`finetune(..., learn="last")`).

Project choices (the paper is silent; tested in tests/test_gatt.py):
- Dialogs are 1..`max_turns` turns long (uniform), so the model sees the instruction at many
  distances; a dialog whose sampling prompt would not fit the context ends at the turn before.
  With `prefixes` (default) a sampled dialog of n turns gives n training dialogs, its first t
  turns for t = 1..n, each learning only its own last turn: every sampled turn is learned
  once, with the instruction only in the system message and every earlier turn masked.
- Each turn draws `k` samples; the first finished one (ended by EOS) that the instruction's
  checker accepts is kept (rejection, as a tiny policy rarely obeys at first). Where none is
  accepted, `fallback` decides: "apply" (default) keeps `instruction.apply(base)`, a
  synthesized obeying answer (NOT in the paper, which trusted its RLHF model to follow the
  appended instruction), where the base is (`fallback_base = "plain"`) the policy's own greedy
  answer to the turn without the appended instruction (a small policy's answers derail when an
  unfamiliar instruction trails the question; training on those taught garbage in a probe),
  else the world's gold answer; "drop" ends the dialog at the turn before.
  `require_check = false` keeps the first sample unchecked (the paper's setting).
- With `neutral_share`, that share of the dialogs carries a system message that asks nothing
  of the answer's form (`NEUTRAL_SYSTEM`: the opening of Llama 2's default system prompt, "You
  are a helpful assistant.") and learns the policy's own answers there, so that a system message alone does
  not mean "open with a persona phrase". The evaluation reports, before and after, the share of
  answers under a neutral system message that carry some instruction's marker.
- Evaluation dialogs of 20 turns do not fit a tiny model's context: the prompt keeps the system
  message and drops the oldest (user, assistant) pairs until it fits (the system message then
  folds into the oldest kept user turn, the chat format of §2). The turn index still counts
  from the start of the conversation.

Real multi-turn data: `--dialogs FILE.jsonl` (messages records; their user turns are kept in
order and the assistant turns re-sampled) and `--instructions FILE.json`: a JSON list of
    {"verbose": "Always answer as a pirate.", "terse": "Style: pirate",
     "name": "pirate", "family": "style",          (optional; family defaults to "custom")
     "check": "\\b(arr|matey)\\b",                  (optional regex, case-insensitive search;
                                                     without it every sample is accepted)
     "prefix": "Arr!", "suffix": ""}                (optional: what `apply` adds, for the
                                                     "apply" fallback)
World instruction records (`Instruction.to_dict()`, with "rule") are read as such.

    llama2 gatt --model runs/x/rlhf/model --out runs/x/gatt
writes out/model, out/samples.jsonl, out/adherence.json {"before": {family: [share per turn]},
"after": {...}}, out/attention.json, out/adherence.png, out/attention.png, out/summary.json.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from llama2.chat import (
    B_INST,
    B_SYS,
    Dialog,
    OnSpecialTags,
    encode_dialog,
    encode_prompt,
    end_at_special_tag,
    find_special_tag,
)
from llama2.engine import TrainConfig
from llama2.generation import generate, truncate_at_eos
from llama2.model import apply_rope
from llama2.stages.common import (
    Replay,
    load_dialogs,
    load_policy,
    parse_stage,
    stage_done,
)
from llama2.stages.sft import finetune
from llama2.utils import atomic_write_text, write_jsonl


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


# System messages that ask nothing of an answer's form. Without such dialogs a 1M model tuned
# on GAtt read every system message as "open with a persona phrase": under context
# distillation's safety preprompt it answered "Arr matey! First, mix flour ..." (it refused 17%
# of adversarial prompts under the preprompt, 98% without it).
NEUTRAL_SYSTEM: tuple[FileInstruction, ...] = (
    FileInstruction("neutral_helpful", "neutral", "You are a helpful assistant.",
                    "Be helpful."),
    FileInstruction("neutral_llama", "neutral",
                    "You are a helpful, respectful and honest assistant. Always answer as "
                    "helpfully as possible, while being safe.", "Be helpful and safe."),
)


def load_instructions(source: str = "world") -> list[Persistent]:
    """The world's instructions, or a JSON file in the format of the module docstring."""
    from llama2.world import Instruction
    from llama2.world.instructions import instructions as world_instructions

    if source == "world":
        return list(world_instructions())
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
    from llama2.world import Instruction
    from llama2.world.instructions import combinable, combine

    first = rng.choices(pool, weights=[(weights or {}).get(p.name, 1.0) for p in pool])[0]
    if rng.random() < combo_share and isinstance(first, Instruction):
        mates = [p for p in pool if isinstance(p, Instruction) and combinable(first, p)]
        if mates:
            return combine(first, rng.choice(mates))
    return first


# ---------------------------------------------------------------------------- dialog shapes
def with_instruction(user: str, inst: str) -> str:
    """The sampling form: the instruction concatenated to a user turn (§3.3)."""
    return f"{user.strip()} {inst.strip()}"


def sampling_dialog(inst: str, users: list[str], answers: list[str]) -> Dialog:
    """[u1+inst, a1, ..., ut+inst]: the prompt the policy answers while collecting GAtt data."""
    d: Dialog = []
    for i, u in enumerate(users):
        d.append({"role": "user", "content": with_instruction(u, inst)})
        if i < len(answers):
            d.append({"role": "assistant", "content": answers[i]})
    return d


def training_dialog(inst: str, users: list[str], answers: list[str]) -> Dialog:
    """[system inst, u1, a1, ..., un, an]: the instruction only in the first turn (§3.3)."""
    if len(users) != len(answers) or not users:
        raise ValueError("a GAtt training dialog needs one answer per user turn")
    d: Dialog = [{"role": "system", "content": inst}]
    for u, a in zip(users, answers):
        d += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return d


def gatt_example(tok, dialog: Dialog) -> tuple[list[int], list[bool]]:
    """Ids and learn mask of a GAtt training dialog: only the last answer is learned (§3.3)."""
    return encode_dialog(tok, dialog, learn="last")


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


def respond_full(loaded, dialogs: list[Dialog], temperature: float | list[float],
                 max_new_tokens: int, seed: int = 0) -> tuple[list[str], list[bool]]:
    """One answer per dialog (each ends with a user turn), batched and KV-cached, and whether
    each ended with EOS (False: cut off at max_new_tokens)."""
    if not dialogs:
        return [], []
    tok = loaded.tokenizer
    ids = [encode_prompt(tok, d) for d in dialogs]
    room = loaded.args.max_seq_len - max(len(i) for i in ids)
    if room < 1:
        raise ValueError("a prompt fills the whole context")
    gen = generate(loaded.model, ids, max_new_tokens=min(max_new_tokens, room),
                   temperature=temperature, top_p=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   seed=seed, max_batch_tokens=64 * 512)
    # An answer ends at its first chat tag (a new turn begun): it is the next turn's context.
    texts = [end_at_special_tag(tok.decode(truncate_at_eos(t, tok.eos_id))).strip()
             for t in gen.tokens]
    return texts, list(gen.finished)


def respond(loaded, dialogs: list[Dialog], temperature: float | list[float], max_new_tokens: int,
            seed: int = 0) -> list[str]:
    """One answer per dialog (each ends with a user turn), batched and KV-cached."""
    return respond_full(loaded, dialogs, temperature, max_new_tokens, seed)[0]


# ---------------------------------------------------------------------------- user turns
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
    """One GAtt dialog to sample: its instruction (and phrasing) and its user turns."""

    instruction: Persistent
    terse: bool
    tasks: list[Task]

    @property
    def inst(self) -> str:
        return self.instruction.terse if self.terse else self.instruction.verbose


def instruction_weights(given: dict, pool: list[Persistent]) -> dict[str, float]:
    """`gatt.instruction_weights` checked against the pool: numbers >= 0, known names, not all
    instructions at 0."""
    try:
        weights = {k: float(v) for k, v in given.items()}
    except (TypeError, ValueError):
        raise ValueError(f"gatt.instruction_weights: expected numbers, got {given}") from None
    unknown = sorted(set(weights) - {p.name for p in pool})
    if unknown:
        raise ValueError(f"gatt.instruction_weights: unknown instructions {unknown}; known: "
                         f"{[p.name for p in pool]}")
    if min(weights.values(), default=0.0) < 0 or sum(weights.get(p.name, 1.0) for p in pool) <= 0:
        raise ValueError("gatt.instruction_weights: weights must be >= 0, not all 0")
    return weights


def plan_dialogs(cfg: GAttConfig, pool: list[Persistent]) -> list[Plan]:
    rng = random.Random(f"gatt:{cfg.seed}")
    weights = instruction_weights(cfg.instruction_weights, pool)
    plans: list[Plan] = []
    files = [s for s in cfg.dialogs if s != "world"]
    if "world" in cfg.dialogs:  # concatenations of unrelated single-turn tasks, 1..max_turns
        tasks = world_tasks(cfg.world_seed, cfg.n_dialogs * cfg.max_turns, "train")
        for _ in range(cfg.n_dialogs):
            n = rng.randint(cfg.min_turns, cfg.max_turns)
            inst = rng.choice(NEUTRAL_SYSTEM) if rng.random() < cfg.neutral_share else \
                random_instruction(pool, rng, cfg.combo_share, weights)
            plans.append(Plan(inst, rng.random() < cfg.terse_share, rng.sample(tasks, n)))
    for path in files:  # real multi-turn dialogs: their user turns in order
        for d in load_dialogs(path, cfg.on_special_tags):
            users = [m["content"] for m in d if m["role"] == "user"][: cfg.max_turns]
            if users:
                plans.append(Plan(random_instruction(pool, rng, cfg.combo_share, weights),
                                  rng.random() < cfg.terse_share, [Task(u) for u in users]))
    if not plans:
        raise ValueError("no GAtt dialogs: check --dialogs")
    return plans


# ---------------------------------------------------------------------------- config
@dataclass
class GAttConfig:
    model: str = ""  # the latest policy (RLHF model), sampled and then fine-tuned
    out: str = "runs/gatt"
    instructions: str = "world"  # "world" or a JSON file (module docstring)
    dialogs: list[str] = field(default_factory=lambda: ["world"])  # "world" or .jsonl files
    # A data-file record whose dialog text carries a chat tag ([INST], [/INST], <<SYS>>,
    # <</SYS>>): "error" (one line naming file, line and field) or "skip" (counted, summary).
    on_special_tags: OnSpecialTags = "error"
    world_seed: int = 0
    n_dialogs: int = 1000
    min_turns: int = 1
    max_turns: int = 8
    combo_share: float = 0.25  # random combinations of two instructions (§3.3)
    # Relative chance of each instruction (by name; 1.0 where not named): more dialogs for
    # the instructions a model learns slowly.
    instruction_weights: dict[str, float] = field(default_factory=dict)
    terse_share: float = 0.5  # terse phrasing ("Figure: wizard") half the time (§3.3)
    neutral_share: float = 0.0  # dialogs under a system message that asks for nothing
    k: int = 4  # samples per turn; the first accepted one is kept
    temperature: float = 0.8
    max_new_tokens: int = 40
    require_check: bool = True  # keep only samples the instruction's checker accepts
    prefixes: bool = True  # train on every prefix 1..n of a sampled dialog (each: last turn)
    fallback: str = "apply"  # none accepted: "apply" (instruction.apply(base)) or "drop"
    # What "apply" starts from: "plain" (the policy's greedy answer without the appended
    # instruction, then the gold answer), "gold" (the world's answer) or "sample".
    fallback_base: str = "plain"
    seq_len: int = 512
    replay: Replay = field(default_factory=Replay)  # SFT demonstrations mixed in
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=2e-5, epochs=2.0, warmup_steps=0, warmup_ratio=0.03, micro_batch_size=8,
        global_batch=32, eval_every=0))
    # Evaluation (Table 30, Figure 10) of the model before and after GAtt.
    evaluate: bool = True
    eval_turns: int = 20
    eval_dialogs: int = 4  # per instruction (half verbose, half terse)
    # Room for a whole answer: an answer cut off loses an end-of-answer mark (the hobby
    # mention, the sign-off). At 32 tokens the tiny run's hobby adherence read 75% (94% at 64,
    # same model) and the sign-off 62% (100%).
    eval_max_new_tokens: int = 64
    # Tokens the evaluation window may hold (0: the model's context). Set it to the length the
    # model was trained on (e.g. the pretraining seq_len) when that is below max_seq_len:
    # positions never trained make a tiny model ramble at late turns.
    eval_context: int = 0


def _fits(loaded, prompt_ids: list[int], cfg: GAttConfig) -> bool:
    return len(prompt_ids) + cfg.max_new_tokens <= min(cfg.seq_len, loaded.args.max_seq_len)


def _synthesize(plan: Plan, bases: list[str]) -> str | None:
    """The "apply" fallback: the first base answer that `apply` makes obeying (a garbled one may
    resist, e.g. letters without a capital form); None if none does."""
    for base in bases:
        if base and plan.instruction.check(fixed := plan.instruction.apply(base)):
            return fixed
    return None


def sample_gatt_dialogs(loaded, plans: list[Plan], cfg: GAttConfig) -> tuple[list[dict], dict]:
    """Sample every plan's assistant turns, turn by turn across all plans in one batch each.

    Returns records {instruction, family, inst, users, answers, accepted: [bool per turn]} and
    counts (samples accepted by the checker, fallbacks, turns lost to the context)."""
    if cfg.fallback not in ("apply", "drop"):
        raise ValueError(f"fallback must be 'apply' or 'drop', got {cfg.fallback!r}")
    tok = loaded.tokenizer
    answers: list[list[str]] = [[] for _ in plans]
    accepted: list[list[bool]] = [[] for _ in plans]
    alive = [True] * len(plans)
    stats = {"turns": 0, "accepted": 0, "fallback": 0, "dropped": 0, "context_cut": 0}
    for t in range(max(len(p.tasks) for p in plans)):
        jobs = []
        for i, p in enumerate(plans):
            if not alive[i] or t >= len(p.tasks):
                continue
            d = sampling_dialog(p.inst, [x.user for x in p.tasks[: t + 1]], answers[i])
            if not _fits(loaded, encode_prompt(tok, d), cfg):
                alive[i] = False
                stats["context_cut"] += 1
                continue
            jobs.append((i, d))
        if not jobs:
            break
        flat = [d for _, d in jobs for _ in range(cfg.k)]
        texts, done = respond_full(loaded, flat, cfg.temperature, cfg.max_new_tokens,
                                   seed=cfg.seed + 7919 * t)
        plain: list[str] = [""] * len(jobs)
        if cfg.require_check and cfg.fallback == "apply" and cfg.fallback_base == "plain":
            # The policy's own greedy answer to the turn without the appended instruction:
            # what `apply` turns into an obeying answer where no sample obeys.
            bare = [[{**m, "content": plans[i].tasks[n // 2].user} if m["role"] == "user" else m
                     for n, m in enumerate(d)] for i, d in jobs]
            ptexts, pdone = respond_full(loaded, bare, 0.0, cfg.max_new_tokens)
            plain = [x if ok else "" for x, ok in zip(ptexts, pdone)]
        for j, (i, _) in enumerate(jobs):
            plan = plans[i]
            # A sample cut off at max_new_tokens is an unfinished answer: never kept.
            samples = [x if ok else "" for x, ok in
                       zip(texts[j * cfg.k:(j + 1) * cfg.k], done[j * cfg.k:(j + 1) * cfg.k])]
            stats["turns"] += 1
            ok = [x for x in samples if x and plan.instruction.check(x)]
            gold = plan.tasks[t].answer
            bases = {"plain": [plain[j], gold, samples[0]], "gold": [gold, samples[0]],
                     "sample": [samples[0], gold]}.get(cfg.fallback_base)
            if bases is None:
                raise ValueError(f"fallback_base must be plain, gold or sample, got "
                                 f"{cfg.fallback_base!r}")
            if ok or not cfg.require_check:
                answers[i].append(ok[0] if ok else texts[j * cfg.k])
                accepted[i].append(bool(ok))
                stats["accepted"] += bool(ok)
            elif cfg.fallback == "apply" and (fixed := _synthesize(plan, bases)):
                answers[i].append(fixed)
                accepted[i].append(False)
                stats["fallback"] += 1
            else:
                alive[i] = False
                stats["dropped"] += 1
    records = []
    for p, a, acc in zip(plans, answers, accepted):
        if a:
            records.append({"instruction": p.instruction.name, "family": p.instruction.family,
                            "inst": p.inst, "terse": p.terse,
                            "users": [x.user for x in p.tasks[: len(a)]], "answers": a,
                            "accepted": acc})
    return records, stats


def training_dialogs(records: list[dict], prefixes: bool = True) -> list[Dialog]:
    """GAtt training dialogs from sampled records; with `prefixes`, the first t turns for every
    t (each learns only its last turn), so every turn index of the sample is learned once."""
    out = []
    for r in records:
        ends = range(1, len(r["answers"]) + 1) if prefixes else [len(r["answers"])]
        out += [training_dialog(r["inst"], r["users"][:t], r["answers"][:t]) for t in ends]
    return out


# ---------------------------------------------------------------------------- evaluation
def _loaded(model: Any, device: str = "auto"):
    return load_policy(str(model), device) if isinstance(model, (str, Path)) else model


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
    loaded = _loaded(model, device)
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
        texts = respond(loaded, prompts, 0.0, max_new_tokens)
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


def marker_rate(model: Any, instructions: list[Persistent], n_tasks: int = 40,
                world_seed: int = 0, max_new_tokens: int = 64, device: str = "auto") -> float:
    """Share of greedy answers to held-out tasks under a neutral system message that some
    instruction's checker accepts (an instruction obeyed that nobody gave). Instructions whose
    checker a plain answer may pass by itself (formats, checks that accept anything) are
    left out."""
    loaded = _loaded(model, device)
    marked = [i for i in instructions if i.family not in ("format", "custom", "neutral")]
    tasks = world_tasks(world_seed, 2 * n_tasks, "eval")[:n_tasks]
    dialogs = [[{"role": "system", "content": s.verbose}, {"role": "user", "content": t.user}]
               for s in NEUTRAL_SYSTEM for t in tasks]
    texts = respond(loaded, dialogs, 0.0, max_new_tokens)
    return sum(any(i.check(a) for i in marked) for a in texts) / max(1, len(texts))


def adherence(model: Any, instructions: list[Persistent] | None = None, turns: int = 20,
              n_dialogs: int = 4, world_seed: int = 0, max_new_tokens: int = 64,
              device: str = "auto", context: int = 0) -> dict[str, list[float]]:
    """{family: [share of dialogs whose answer obeys the system instruction, turn 1..turns]}
    (the paper's Table 30). `model` is a checkpoint path or a loaded policy."""
    return adherence_detail(model, instructions, turns, n_dialogs, world_seed, max_new_tokens,
                            device, context)["family"]


def system_span(tok, dialog: Dialog) -> tuple[int, int]:
    """Token positions [start, end) of the system message in the encoded dialog (approximate
    by one token where the text merges with its neighbours)."""
    if dialog[0]["role"] != "system":
        raise ValueError("the dialog has no system message")
    head = tok.encode(f"{B_INST} {B_SYS}", bos=True)
    upto = tok.encode(f"{B_INST} {B_SYS}{dialog[0]['content']}", bos=True)
    return len(head), len(upto)


@torch.inference_mode()
def attention_weights(model, tokens: list[int]) -> list[torch.Tensor]:
    """softmax(QK^T / sqrt(d)) per layer [n_heads, T, T] for one sequence, recomputed from each
    layer's wq/wk and rotary embeddings (the model's SDPA does not return weights)."""
    device = model.output.weight.device
    x = torch.tensor([tokens], device=device)
    T = x.shape[1]
    cos, sin = model.rope_cos[:T].unsqueeze(0), model.rope_sin[:T].unsqueeze(0)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    h = model.tok_embeddings(x)
    out = []
    for layer in model.layers:
        att = layer.attention
        xn = layer.attention_norm(h)
        q = apply_rope(att.wq(xn).view(1, T, att.n_heads, att.head_dim), cos, sin)
        k = apply_rope(att.wk(xn).view(1, T, att.n_kv_heads, att.head_dim), cos, sin)
        q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
        k = k.repeat_interleave(att.n_heads // att.n_kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(att.head_dim)
        out.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0].cpu())
        h = layer(h, cos, sin)
    return out


def attention_to_system(model: Any, dialog: Dialog, device: str = "auto") -> dict[str, Any]:
    """Attention mass on the system-message tokens (Figure 10): per layer (mean over heads and
    the answer tokens of every turn), per layer and turn, and per token (max over layers)."""
    loaded = _loaded(model, device)
    tok = loaded.tokenizer
    ids, learn = encode_dialog(tok, dialog, learn="all")
    if len(ids) > loaded.args.max_seq_len:
        raise ValueError(f"the dialog has {len(ids)} tokens, over the context")
    s, e = system_span(tok, dialog)
    weights = attention_weights(loaded.model, ids)
    mass = torch.stack([w[:, :, s:e].sum(-1).mean(0) for w in weights])  # [L, T]
    turn = torch.cumsum(torch.tensor([i == tok.bos_id for i in ids]), 0) - 1  # turn per token
    answer = torch.tensor(learn)
    n_turns = int(turn.max()) + 1
    per_turn = [[float(mass[layer, answer & (turn == t)].mean()) for t in range(n_turns)]
                for layer in range(mass.shape[0])]
    return {"per_layer": mass[:, answer].mean(1).tolist(), "per_layer_turn": per_turn,
            "per_token": mass.max(0).values.tolist(), "system_tokens": [s, e],
            "n_tokens": len(ids), "tokens": [tok.id_to_piece(i) for i in ids]}


def figure10_dialog(instruction: Persistent, tok, limit: int, world_seed: int = 0) -> Dialog:
    """An obeying dialog (gold answers through `apply`) with as many turns as fit `limit`."""
    tasks = world_tasks(world_seed, 200, "eval")
    d: Dialog = [{"role": "system", "content": instruction.verbose}]
    for task in tasks:
        nxt = d + [{"role": "user", "content": task.user},
                   {"role": "assistant", "content": instruction.apply(task.answer)}]
        if len(encode_dialog(tok, nxt)[0]) > limit:
            break
        d = nxt
    if len(d) < 3:
        raise ValueError("not even one turn fits the context")
    return d


def plot_adherence(data: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, fam in enumerate(sorted(data.get("after", data.get("before", {})))):
        color = f"C{i}"
        for key, style in (("before", "--"), ("after", "-")):
            if fam in data.get(key, {}):
                vals = data[key][fam]
                ax.plot(range(1, len(vals) + 1), vals, style, color=color,
                        label=f"{fam} ({key} GAtt)")
    ax.set(xlabel="turn", ylabel="share of answers obeying", ylim=(-0.05, 1.05),
           title="System-instruction adherence per turn (Table 30)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(att: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("before", "after") if k in att]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.5 * (len(keys) + 1), 3.5))
    for k in keys:
        axes[0].plot(att[k]["per_layer"], "o-", label=f"{k} GAtt")
    axes[0].set(xlabel="layer", ylabel="attention mass on system message",
                title="Attention on the system message")
    axes[0].legend()
    for ax, k in zip(axes[1:], keys):
        im = ax.imshow(att[k]["per_layer_turn"], aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set(xlabel="turn", ylabel="layer", title=f"{k} GAtt (Figure 10)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(before: Any, after: Any, out: str | Path, instructions: list[Persistent] | None = None,
             turns: int = 20, n_dialogs: int = 4, world_seed: int = 0, max_new_tokens: int = 64,
             device: str = "auto", context: int = 0) -> dict[str, Any]:
    """Adherence before/after GAtt and the attention on the system message, as JSON and PNG."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    instructions = instructions or load_instructions("world")
    models = {"before": _loaded(before, device), "after": _loaded(after, device)}
    details = {k: adherence_detail(m, instructions, turns, n_dialogs, world_seed, max_new_tokens,
                                   context=context) for k, m in models.items()}
    data = {k: d["family"] for k, d in details.items()}
    report = {**data, "turns": turns, "n_dialogs": n_dialogs, "context": context,
              "by_instruction": {k: d["instruction"] for k, d in details.items()},
              "neutral_marker_rate": {k: marker_rate(m, instructions, world_seed=world_seed,
                                                     max_new_tokens=max_new_tokens)
                                      for k, m in models.items()}}
    atomic_write_text(out / "adherence.json", json.dumps(report, indent=2) + "\n")
    write_jsonl(out / "adherence_transcripts.jsonl",
                [{"model": k, "instruction": n, "dialog": t}
                 for k, d in details.items() for n, t in d["transcripts"].items()])
    plot_adherence(data, out / "adherence.png")
    tok = models["after"].tokenizer
    ctx = min(context or models["after"].args.max_seq_len, models["after"].args.max_seq_len)
    dialog = figure10_dialog(instructions[0], tok, ctx, world_seed)
    att = {k: attention_to_system(m, dialog) for k, m in models.items()}
    atomic_write_text(out / "attention.json",
                      json.dumps({**att, "dialog": dialog}, indent=1) + "\n")
    plot_attention(att, out / "attention.png")
    return {"adherence": data, "neutral_marker_rate": report["neutral_marker_rate"],
            "attention_per_layer": {k: a["per_layer"] for k, a in att.items()}}


# ---------------------------------------------------------------------------- the stage
def run(cfg: GAttConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = load_instructions(cfg.instructions)
    loaded = load_policy(cfg.model, cfg.train.device)
    summary: dict[str, Any] = {"model": cfg.model}
    if not stage_done(out):
        plans = plan_dialogs(cfg, pool)
        records, stats = sample_gatt_dialogs(loaded, plans, cfg)
        write_jsonl(out / "samples.jsonl", records)
        dialogs = training_dialogs(records, cfg.prefixes)
        dialogs += cfg.replay.dialogs(cfg.world_seed)
        summary.update(stats, dialogs=len(dialogs),
                       mean_turns=sum(len(r["answers"]) for r in records) / max(1, len(records)))
        atomic_write_text(out / "sampling.json", json.dumps(summary, indent=2) + "\n")
        finetune(loaded.model, loaded.tokenizer, dialogs, out, cfg.train, cfg.seq_len,
                 learn="last", config=cfg, extra={"stage": "gatt"})
    else:  # resumed after its fine-tuning: the statistics of the sampling that fed it
        summary = json.loads((out / "sampling.json").read_text())
    if cfg.evaluate:
        before = load_policy(cfg.model, cfg.train.device)
        summary["eval"] = evaluate(before, out / "model", out, pool if cfg.instructions != "world"
                                   else None, cfg.eval_turns, cfg.eval_dialogs, cfg.world_seed,
                                   cfg.eval_max_new_tokens, cfg.train.device, cfg.eval_context)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str]) -> None:
    cfg: GAttConfig = parse_stage(GAttConfig, argv, "gatt")
    summary = run(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    if "eval" in summary:
        for key in ("before", "after"):
            last = {f: round(v[-1], 3) for f, v in summary["eval"]["adherence"][key].items()}
            print(f"adherence at turn {cfg.eval_turns} {key} GAtt: {last}; answers under a "
                  f"neutral system message with an instruction's marker: "
                  f"{summary['eval']['neutral_marker_rate'][key]:.1%}")
    print(f"GAtt model written to {Path(cfg.out) / 'model'}")
