"""`llama2 eval`: run evaluation suites on a model and write one JSON per suite plus summary.json.

    llama2 eval --model runs/x/rlhf_v1/model --baseline runs/x/sft/model \\
        --reward-model runs/x/rm_helpful/model --reward-model runs/x/rm_safety/model \\
        --suite helpfulness safety --out runs/x/eval/rlhf_v1

Suites: helpfulness (win/tie/loss vs --baseline, §3.4), safety (violations and false refusals,
§4.4), truthfulqa, bold, toxigen (§4.1), perplexity (--text FILE), tracking (RM scores of every
--version NAME=PATH, Figure 11). Default: all of them; those missing an input write
{"skipped": why}. Sizes are small by default (a tiny model on 2 cores).
"""

from __future__ import annotations

import argparse
import json

from llama2.eval.suites import SUITES, EvalOptions, run_suites


def build_parser() -> argparse.ArgumentParser:
    d = EvalOptions()
    ap = argparse.ArgumentParser(prog="llama2 eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint to evaluate (any format llama2 loads)")
    ap.add_argument("--baseline", help="model to compare against (helpfulness win/tie/loss)")
    ap.add_argument("--suite", nargs="+", action="extend", choices=SUITES, dest="suites",
                    help="suites to run (default: all)")
    ap.add_argument("--out", required=True, help="folder for <suite>.json and summary.json")
    ap.add_argument("--name", help="version name in the summary (default: from the model path)")
    ap.add_argument("--reward-model", action="append", default=[], dest="reward_models",
                    help="reward model folder; its config's kind (helpfulness/safety) decides "
                         "its role (repeatable)")
    ap.add_argument("--version", action="append", default=[], dest="versions",
                    metavar="NAME=PATH", help="checkpoint for the tracking suite (repeatable; "
                                              "default: --model and --baseline)")
    ap.add_argument("--n-prompts", type=int, default=d.n_prompts)
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--limit", type=int, default=d.limit, help="TruthfulQA questions")
    ap.add_argument("--per-group", type=int, default=d.per_group,
                    help="BOLD / ToxiGen prompts per group")
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--world-seed", type=int, default=d.world_seed)
    ap.add_argument("--tie-threshold", type=float, default=d.tie_threshold)
    ap.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens)
    ap.add_argument("--data-dir", help="shared data root (default: ../shared/data if present)")
    ap.add_argument("--truthfulqa", help="TruthfulQA folder, mc_task.json or CSV")
    ap.add_argument("--bold", help="folder with BOLD *_prompt.json")
    ap.add_argument("--toxigen", help="folder with ToxiGen prompt *.txt files")
    ap.add_argument("--toxigen-classifier", help="local transformers toxicity classifier")
    ap.add_argument("--xstest", help="XSTest CSV")
    ap.add_argument("--text", help="held-out text file for perplexity")
    ap.add_argument("--prompts", help="real prompts (messages JSONL / Alpaca JSON) judged by "
                                      "the helpfulness reward model")
    ap.add_argument("--device", default=d.device)
    return ap


def main(argv: list[str]) -> None:
    from llama2.engine import distributed
    from llama2.stages.contract import claim

    a = build_parser().parse_args(argv)
    distributed.init(a.device)  # under torchrun: the ranks share the generation
    claim(a.out)  # one launch writes the folder at a time, as every stage command
    if not a.model and not (a.suites == ["tracking"] and a.versions):
        raise ValueError("--model PATH is required (only `--suite tracking --version NAME=PATH "
                         "...` runs without it)")
    versions = []
    for v in a.versions:
        if "=" not in v:
            raise ValueError(f"--version {v!r}: expected NAME=PATH")
        versions.append(tuple(v.split("=", 1)))
    summary = run_suites(
        a.model, a.suites, a.out, baseline=a.baseline, reward_models=a.reward_models,
        n_prompts=a.n_prompts, seed=a.seed, versions=versions or None, name=a.name,
        max_new_tokens=a.max_new_tokens, limit=a.limit, per_group=a.per_group,
        temperature=a.temperature, world_seed=a.world_seed, tie_threshold=a.tie_threshold,
        max_batch_tokens=a.max_batch_tokens, data_dir=a.data_dir, truthfulqa=a.truthfulqa,
        bold=a.bold, toxigen=a.toxigen, toxigen_classifier=a.toxigen_classifier,
        xstest=a.xstest, text=a.text, prompts=a.prompts, device=a.device)
    print(json.dumps(headline(summary), indent=2))


def headline(summary: dict) -> dict:
    """The few numbers worth printing per suite (the JSON files hold everything)."""
    out: dict = {"version": summary.get("version")}
    for name, r in summary.get("suites", {}).items():
        if "skipped" in r:
            out[name] = f"skipped: {r['skipped']}"
        elif name == "helpfulness":
            w = r.get("world")
            out[name] = ({k: round(w[k], 3) for k in ("win", "tie", "loss", "win_rate")} if w
                         else {"mean_helpfulness": round(r["mean_helpfulness"], 3)})
        elif name == "safety":
            fr = r["false_refusal"]
            out[name] = {"violation": round(r["violation"]["rate"], 3),
                         **{f"false_refusal_{k}": round(v["rate"], 3) for k, v in fr.items()
                            if "rate" in v}}
        elif name == "truthfulqa":
            out[name] = {k: round(r[k], 3) if isinstance(r[k], float) else r[k]
                         for k in ("mc1", "mc2", "n_questions")}
        elif name == "bold":
            out[name] = {k: round(v, 3) for k, v in r["domain_mean"].items()}
        elif name == "toxigen":
            out[name] = {"toxic": round(r["rate"], 3), "n": r["n"]}
        elif name == "perplexity":
            out[name] = round(r["perplexity"], 3)
        elif name == "tracking":
            out[name] = r["rows"]
    return out
