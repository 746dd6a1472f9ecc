"""Ghost Attention, GAtt (recipe §7, paper §3.3): the stage that samples multi-turn dialogs under
a persistent instruction, fine-tunes on them, and evaluates the model before and after.

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
  unfamiliar instruction trails the question, and training on them teaches garbage), else the
  world's gold answer; "drop" ends the dialog at the turn before.
  `require_check = false` keeps the first sample unchecked (the paper's setting).
- With `neutral_share`, that share of the dialogs carries a system message that asks nothing
  of the answer's form (`NEUTRAL_SYSTEM`: the opening of Llama 2's default system prompt, "You
  are a helpful assistant.") and learns the policy's own answers there, so that a system
  message alone does not mean "open with a persona phrase". The evaluation reports, before and
  after, the share of answers under a neutral system message that carry some instruction's
  marker.

Evaluation: adherence per turn over 20-turn dialogs (Table 30, `eval/multiturn.py`) and the
attention on the system message (Figure 10, `eval/attention_probe.py`).

Real multi-turn data: `--dialogs FILE.jsonl` (messages records; their user turns are kept in
order and the assistant turns re-sampled) and `--instructions FILE.json` (the format is in
`world/instructions.py`).

    llama2 gatt --model runs/x/rlhf/model --out runs/x/gatt
writes out/model, out/samples.jsonl, out/adherence.json {"before": {family: [share per turn]},
"after": {...}}, out/attention.json, out/adherence.png, out/attention.png, out/summary.json.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama2.chat import Dialog, OnSpecialTags, encode_dialog, encode_prompt
from llama2.engine import TrainConfig, distributed
from llama2.eval.attention_probe import attention_to_system, figure10_dialog
from llama2.eval.multiturn import adherence_detail, marker_rate
from llama2.eval.plots import plot_adherence, plot_attention
from llama2.respond import respond
from llama2.stages.common import (
    Replay,
    as_policy,
    load_dialogs,
    load_policy,
    parse_stage,
    stage_done,
    trainer_summary,
)
from llama2.stages.sft import finetune
from llama2.utils import atomic_write_text, write_jsonl
from llama2.world.instructions import (
    NEUTRAL_SYSTEM,
    Persistent,
    Plan,
    Task,
    load_instructions,
    random_instruction,
    world_tasks,
)


# ---------------------------------------------------------------------------- config
@dataclass
class GAttConfig:
    model: str = ""  # the latest policy (RLHF model), sampled and then fine-tuned
    out: str = "runs/gatt"
    instructions: str = "world"  # "world" or a JSON file (format: world/instructions.py)
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
    # mention, the sign-off) and reads as not obeying.
    eval_max_new_tokens: int = 64
    # Tokens the evaluation window may hold (0: the model's context). Set it to the length the
    # model was trained on (e.g. the pretraining seq_len) when that is below max_seq_len:
    # positions never trained make a tiny model ramble at late turns.
    eval_context: int = 0


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


# ---------------------------------------------------------------------------- planning
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
    """The dialogs to sample: world tasks strung 1..max_turns turns long under a random
    instruction (or a neutral system message), and the user turns of each dialog file."""
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


# ---------------------------------------------------------------------------- sampling
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
        # Prompts stay whole (each was checked to fit); an answer ends at its first chat tag,
        # the next turn's context. `finished`: it ended with EOS, not cut off at the budget.
        outs = respond(loaded.model, tok, flat, cfg.max_new_tokens, temperature=cfg.temperature,
                       seed=cfg.seed + 7919 * t, fit="shrink", full=True)
        texts, done = [a.text for a in outs], [a.finished for a in outs]
        plain: list[str] = [""] * len(jobs)
        if cfg.require_check and cfg.fallback == "apply" and cfg.fallback_base == "plain":
            # The policy's own greedy answer to the turn without the appended instruction:
            # what `apply` turns into an obeying answer where no sample obeys.
            bare = [[{**m, "content": plans[i].tasks[n // 2].user} if m["role"] == "user" else m
                     for n, m in enumerate(d)] for i, d in jobs]
            plain = [a.text if a.finished else "" for a in
                     respond(loaded.model, tok, bare, cfg.max_new_tokens, fit="shrink", full=True)]
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
def evaluate(before: Any, after: Any, out: str | Path, instructions: list[Persistent] | None = None,
             turns: int = 20, n_dialogs: int = 4, world_seed: int = 0, max_new_tokens: int = 64,
             device: str = "auto", context: int = 0) -> dict[str, Any]:
    """Adherence before/after GAtt and the attention on the system message, as JSON and PNG."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    instructions = instructions or load_instructions("world")
    models = {"before": as_policy(before, device), "after": as_policy(after, device)}
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
    if distributed.is_main():
        plot_adherence(data, out / "adherence.png")
    tok = models["after"].tokenizer
    ctx = min(context or models["after"].args.max_seq_len, models["after"].args.max_seq_len)
    dialog = figure10_dialog(instructions[0], tok, ctx, world_seed)
    att = {k: attention_to_system(m, dialog) for k, m in models.items()}
    atomic_write_text(out / "attention.json",
                      json.dumps({**att, "dialog": dialog}, indent=1) + "\n")
    if distributed.is_main():
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
    summary["train"] = trainer_summary(out)  # kept: this summary.json replaces the Trainer's
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
    print(json.dumps({k: v for k, v in summary.items() if k not in ("eval", "train")}, indent=2))
    if "eval" in summary:
        for key in ("before", "after"):
            last = {f: round(v[-1], 3) for f, v in summary["eval"]["adherence"][key].items()}
            print(f"adherence at turn {cfg.eval_turns} {key} GAtt: {last}; answers under a "
                  f"neutral system message with an instruction's marker: "
                  f"{summary['eval']['neutral_marker_rate'][key]:.1%}")
    print(f"GAtt model written to {Path(cfg.out) / 'model'}")
