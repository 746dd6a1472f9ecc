"""Targeted safety context distillation (recipe §8, paper §4.2.4, Figure 16), and the entry
points of the other safety studies.

    llama2 distill --model M --safety-rm S --out runs/x/distill [--preprompt category|generic]
                   [--gate false] [--also_ungated true]
    llama2 distill --scaling --model runs/x/pretrain/model --out runs/x   (Figure 15, safety.py)
    llama2 distill --redteam --models sft=P1,rlhf=P2 --out runs/x/redteam (§4.3, redteam.py)

Context distillation: answer adversarial prompts with a safety preprompt as system message,
then fine-tune on those answers *without* the preprompt, so the model behaves as if it had
read it. Preprompts: the generic "You are a safe and responsible assistant", or (default) one
per risk category with an answer template, written for the world's three categories in the
style of the paper's Table 39. The gate (§4.2.4): a distilled answer is kept only where the
Safety RM scores it above the model's answer without the preprompt (`--gate false` keeps all,
the ungated variant of Figure 16: in the paper its answers turn vague and raise false refusals;
in the world it mostly re-teaches refusals the model already gave, and with few benign prompts
with sensitive words beside them those refusals spread to borderline prompts).

Project choices: by default only adversarial prompts are distilled (targeted, as the paper);
`n_helpful`/`n_borderline` add benign prompts (with sensitive words for borderline) the same
way, with the generic preprompt, to study what untargeted distillation does. `replay`
mixes SFT demonstrations into the fine-tuning so the small distillation set does not wash out
helpfulness. Prompts whose distilled answer is not kept are left out of the training set.
Answers are greedy (temperature 0) by default.
Writes out/model, out/distilled.jsonl, out/summary.json (kept counts, mean Safety RM score
with/without the preprompt, and the annotator evaluation before/after).
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama2.chat import with_system
from llama2.engine import TrainConfig
from llama2.respond import respond
from llama2.stages.common import Replay, load_policy, parse_stage, stage_done, trainer_summary
from llama2.stages.safety import evaluate_safety, without_lists
from llama2.stages.sft import finetune
from llama2.utils import atomic_write_text, write_jsonl

GENERIC_PREPROMPT = "You are a safe and responsible assistant."

# Risk-category preprompts with an answer template (paper Table 39 style), for the world's
# categories (records.RISK_CATEGORIES).
CATEGORY_PREPROMPTS: dict[str, str] = {
    "illicit": (
        "You are a safe and responsible assistant. You never help with crimes such as stealing, "
        "breaking in, fake money or getting into accounts. If a request asks for that, answer "
        "like this: 'I can't help with that. It is against the law and hurts people. You could "
        "...' and give a legal thing the person could do instead."),
    "hateful": (
        "You are a safe and responsible assistant. You never help to hurt, bully or insult "
        "people or animals. If a request asks for that, answer like this: 'I'm sorry, but I "
        "won't help with that. It is wrong and can hurt someone. You could ...' and give a "
        "kind thing the person could do instead."),
    "unqualified_advice": (
        "You are a safe and responsible assistant. You are not a doctor, a lawyer or a money "
        "expert, and you never give risky medical, legal or money advice. If a request asks "
        "for that, answer like this: 'I can't help with that. I am not a doctor, and it could "
        "be dangerous. Please ask a doctor, a lawyer or a money expert.'"),
}


def preprompt_for(prompt, mode: str) -> str:
    """The safety preprompt of a prompt: per risk category, or generic."""
    if mode not in ("category", "generic"):
        raise ValueError(f"preprompt must be 'category' or 'generic', got {mode!r}")
    if mode == "category" and prompt.category in CATEGORY_PREPROMPTS:
        return CATEGORY_PREPROMPTS[prompt.category]
    return GENERIC_PREPROMPT


@dataclass
class DistillConfig:
    model: str = ""  # the policy to distill into (SFT or RLHF model)
    safety_rm: str = ""  # the Safety RM folder that gates the distilled answers
    out: str = "runs/distill"
    world_seed: int = 0
    prompt_offset: int = 1000  # take train prompts after the first N (fresh, not SFT's)
    n_safety: int = 300  # adversarial prompts
    # Benign prompts distilled the same way (0: the paper's targeted distillation, adversarial
    # prompts only).
    n_helpful: int = 0
    n_borderline: int = 0
    replay: Replay = field(default_factory=Replay)  # SFT demonstrations mixed in
    preprompt: str = "category"  # "category" (with answer templates) or "generic"
    gate: bool = True  # keep a distilled answer only where the Safety RM prefers it
    margin: float = 0.0  # required Safety RM gain (logits) for the gate
    also_ungated: bool = False  # also train the ungated variant in out/ungated (Figure 16)
    temperature: float = 0.0
    max_new_tokens: int = 48
    seed: int = 0
    seq_len: int = 256
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=2e-5, epochs=2.0, warmup_steps=0, warmup_ratio=0.03, micro_batch_size=8,
        global_batch=32, eval_every=0))
    evaluate: bool = True
    n_eval_helpful: int = 200
    n_eval_safety: int = 200
    n_eval_borderline: int = 100
    annotator_seed: int = 0


def distill_prompts(cfg: DistillConfig) -> list:
    from llama2.world import World

    world, o = World(cfg.world_seed), cfg.prompt_offset
    return (world.safety_prompts(o + cfg.n_safety, "train")[o:]
            + world.helpful_prompts(o + cfg.n_helpful, "train")[o:]
            + world.borderline_prompts(cfg.n_borderline, "train"))


def generate_pairs(cfg: DistillConfig, loaded, prompts) -> list[dict[str, Any]]:
    """Each prompt's answer without and with its preprompt, both scored by the Safety RM on
    the dialog without the preprompt (what the distilled model will see)."""
    from llama2.reward import Scorer
    from llama2.world import Annotator

    model, tok = loaded.model, loaded.tokenizer
    plain = respond(model, tok, [p.dialog for p in prompts], cfg.max_new_tokens,
                    temperature=cfg.temperature, seed=cfg.seed, fit="skip")
    pre = [preprompt_for(p, cfg.preprompt) for p in prompts]
    distilled: list[str] = [""] * len(prompts)
    for text in sorted(set(pre)):  # one batched call per preprompt
        idx = [i for i, t in enumerate(pre) if t == text]
        outs = respond(model, tok, [with_system(prompts[i].dialog, text) for i in idx],
                       cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed, fit="skip")
        for i, o in zip(idx, outs):
            distilled[i] = o
    rows: list[dict[str, Any]] = []
    ann = Annotator(cfg.annotator_seed, noise=False)
    if cfg.safety_rm:
        scorer = Scorer(cfg.safety_rm, loaded.model.output.weight.device, tok)
        dialogs = [p.dialog for p in prompts]
        s_plain = scorer(dialogs, plain).tolist()
        s_dist = scorer(dialogs, distilled).tolist()
    elif cfg.gate:
        raise ValueError("the gate needs a Safety RM (set --safety_rm PATH, or --gate false)")
    else:
        s_plain = s_dist = [float("nan")] * len(prompts)
    for p, a, b, sa, sb, pp in zip(prompts, plain, distilled, s_plain, s_dist, pre):
        rows.append({"prompt": p.to_dict(), "kind": p.kind, "preprompt": pp, "plain": a,
                     "distilled": b, "rm_plain": sa, "rm_distilled": sb,
                     "gate": bool(b) and bool(sb > sa + cfg.margin),
                     "annotator_safety": [ann.safety(p, a), ann.safety(p, b)],
                     "refusal": [ann.is_refusal(a), ann.is_refusal(b)]})
    return rows


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in sorted({r["kind"] for r in rows}):
        rs = [r for r in rows if r["kind"] == kind]
        out[kind] = {
            "prompts": len(rs), "kept_gated": sum(r["gate"] for r in rs),
            "mean_rm_plain": _mean([r["rm_plain"] for r in rs]),
            "mean_rm_distilled": _mean([r["rm_distilled"] for r in rs]),
            "mean_rm_distilled_kept": _mean([r["rm_distilled"] for r in rs if r["gate"]]),
            "annotator_safety_plain": _mean([r["annotator_safety"][0] for r in rs]),
            "annotator_safety_distilled": _mean([r["annotator_safety"][1] for r in rs]),
            "refusal_plain": _mean([float(r["refusal"][0]) for r in rs]),
            "refusal_distilled": _mean([float(r["refusal"][1]) for r in rs]),
            "refusal_distilled_kept": _mean([float(r["refusal"][1]) for r in rs if r["gate"]]),
            "by_initial_score": score_change_by_initial(rs),
        }
    return out


def score_change_by_initial(rows: list[dict[str, Any]], parts: int = 3) -> list[dict[str, Any]]:
    """Figure 16 (right): the Safety RM score change that distillation brings, by the score of
    the answer without the preprompt (prompts sorted by it, cut in `parts` equal groups): the
    paper's preprompt lifts low scores and can lower high ones, hence the gate."""
    rows = sorted((r for r in rows if r["distilled"]), key=lambda r: r["rm_plain"])
    groups = [rows[i * len(rows) // parts:(i + 1) * len(rows) // parts] for i in range(parts)]
    return [{"prompts": len(g), "rm_plain": _mean([r["rm_plain"] for r in g]),
             "rm_change": _mean([r["rm_distilled"] - r["rm_plain"] for r in g]),
             "annotator_safety_change": _mean([r["annotator_safety"][1] - r["annotator_safety"][0]
                                               for r in g]),
             "kept_gated": sum(r["gate"] for r in g)} for g in groups if g]


def training_dialogs(rows: list[dict[str, Any]], gated: bool) -> list:
    from llama2.world import Prompt

    return [Prompt.from_dict(r["prompt"]).with_answer(r["distilled"]) for r in rows
            if r["distilled"] and (r["gate"] or not gated)]


def run(cfg: DistillConfig) -> dict[str, Any]:
    if cfg.gate and not cfg.safety_rm:
        raise ValueError("the gate needs a Safety RM (set --safety_rm PATH, or --gate false)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_policy(cfg.model, cfg.train.device)
    prompts = distill_prompts(cfg)
    rows = generate_pairs(cfg, loaded, prompts)
    write_jsonl(out / "distilled.jsonl", rows)
    summary: dict[str, Any] = {"model": cfg.model, "preprompt": cfg.preprompt, "gate": cfg.gate,
                               "by_kind": summarize(rows)}
    variants = [("model", cfg.gate)] + ([("ungated", False)] if cfg.also_ungated and cfg.gate
                                        else [])
    for name, gated in variants:
        folder = out if name == "model" else out / name
        dialogs = training_dialogs(rows, gated)
        summary[f"kept_{name}"] = len(dialogs)
        if not dialogs:
            print(f"distill: no distilled answer kept for {name}", file=sys.stderr)
        dialogs += cfg.replay.dialogs(cfg.world_seed)
        if not dialogs:
            raise ValueError("no distilled answer was kept: nothing to fine-tune on")
        if not stage_done(folder):
            # The first variant trains the loaded policy in place; the second starts afresh.
            policy = loaded if name == "model" else load_policy(cfg.model, cfg.train.device)
            finetune(policy.model, policy.tokenizer, dialogs, folder, cfg.train, cfg.seq_len,
                     learn="last", config=cfg, extra={"stage": "distill", "gated": gated})
    summary["kept"] = summary["kept_model"]
    summary["train"] = trainer_summary(out)  # kept: this summary.json replaces the Trainer's
    if cfg.evaluate:
        args = (cfg.world_seed, cfg.n_eval_helpful, cfg.n_eval_safety, cfg.n_eval_borderline,
                cfg.max_new_tokens, cfg.annotator_seed, cfg.train.device)
        ev = {"before": evaluate_safety(cfg.model, *args),
              "gated" if cfg.gate else "ungated": evaluate_safety(out / "model", *args)}
        if len(variants) > 1:
            ev["ungated"] = evaluate_safety(out / "ungated" / "model", *args)
        summary["eval"] = {k: without_lists(v) for k, v in ev.items()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("--scaling", "scaling"):
        from llama2.stages import safety

        return safety.main(argv[1:])
    if argv and argv[0] in ("--redteam", "redteam"):
        from llama2.stages import redteam

        return redteam.main(argv[1:])
    cfg: DistillConfig = parse_stage(DistillConfig, argv, "distill")
    summary = run(cfg)
    # The Trainer's own summary stays in the file (it logged its progress already).
    shown = {k: v for k, v in summary.items() if k != "train"}
    if "eval" in shown:  # the per-prompt flags stay in the file
        shown["eval"] = {m: {k: x for k, x in e.items() if not isinstance(x, list)}
                         for m, e in shown["eval"].items()}
    json.dump(shown, sys.stdout, indent=2)
    print(f"\ndistilled model written to {Path(cfg.out) / 'model'}")
