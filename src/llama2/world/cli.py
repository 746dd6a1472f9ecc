"""`llama2 world export --out DIR` and `llama2 world calibrate`.

export writes every part of the world in the same file formats the real-data adapters read,
atomically, so a user can inspect the data and other stages can take it as files:
  corpus.txt                  pretraining documents, separated by blank lines
  sft.jsonl                   demonstrations, {"messages": [...]} per line
  helpful_prompts.jsonl       Prompt.to_dict() per line, train then eval (meta["split"])
  safety_prompts.jsonl        same, adversarial prompts
  borderline_prompts.jsonl    same, benign prompts with sensitive words
  preferences_example.jsonl   annotated comparisons of gold vs degraded answers (PreferencePair)
  instructions.json           Ghost Attention instructions (Instruction.to_dict())
  manifest.json               seed, arguments and record counts
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from llama2.utils import atomic_write_text, write_jsonl
from llama2.world.adapters import write_messages_jsonl, write_preferences_jsonl
from llama2.world.annotator import Annotator
from llama2.world.calibrate import calibration, format_table, response_ladder
from llama2.world.records import PreferencePair
from llama2.world.world import World


def export(out: str | Path, seed: int = 0, n_tokens: int = 2_000_000, n_helpful: int = 2000,
           n_safety: int = 600, n_borderline: int = 100, n_eval: int = 300,
           n_sft_helpful: int = 400, n_sft_safety: int = 100, n_preferences: int = 400,
           ) -> dict[str, int]:
    """Write the world to `out`; returns record counts per file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world, ann = World(seed), Annotator(seed)
    counts: dict[str, int] = {}

    docs = list(world.corpus(n_tokens))
    atomic_write_text(out / "corpus.txt", "\n\n".join(docs) + "\n")
    counts["corpus.txt"] = len(docs)

    sft = world.demonstrations(n_sft_helpful, n_sft_safety, "train")
    write_messages_jsonl(out / "sft.jsonl", sft)
    counts["sft.jsonl"] = len(sft)

    sets = {
        "helpful_prompts.jsonl": world.helpful_prompts(n_helpful, "train")
        + world.helpful_prompts(n_eval, "eval"),
        "safety_prompts.jsonl": world.safety_prompts(n_safety, "train")
        + world.safety_prompts(max(1, n_eval // 2), "eval"),
        "borderline_prompts.jsonl": world.borderline_prompts(n_borderline, "train")
        + world.borderline_prompts(n_borderline, "eval"),
    }
    for name, prompts in sets.items():
        write_jsonl(out / name, (p.to_dict() for p in prompts))
        counts[name] = len(prompts)

    # Example comparisons: pairs from the calibration ladder, helpfulness and safety aspects.
    rng = random.Random(f"export-preferences:{seed}")
    helpful = sets["helpful_prompts.jsonl"][:n_helpful]
    unsafe = sets["safety_prompts.jsonl"][:n_safety]
    pairs: list[PreferencePair] = []
    for i in range(n_preferences):
        p = rng.choice(unsafe) if i % 3 == 2 else rng.choice(helpful)
        ladder = list(response_ladder(p, rng.choice(helpful), rng).values())
        a, b = rng.sample([r for r in ladder if r], 2)
        aspect = "safety" if p.kind == "safety" else "helpfulness"
        pairs.append(ann.compare(p, a, b, aspect).to_pair())
    write_preferences_jsonl(out / "preferences_example.jsonl", pairs)
    counts["preferences_example.jsonl"] = len(pairs)

    insts = [i.to_dict() for i in world.instructions()]
    atomic_write_text(out / "instructions.json", json.dumps(insts, indent=2) + "\n")
    counts["instructions.json"] = len(insts)

    manifest = {"seed": seed, "n_tokens": n_tokens, "counts": counts}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return counts


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="llama2 world", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write the world's data to files")
    ex.add_argument("--out", required=True)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--n-tokens", type=int, default=2_000_000)
    ex.add_argument("--n-helpful", type=int, default=2000)
    ex.add_argument("--n-safety", type=int, default=600)
    ex.add_argument("--n-borderline", type=int, default=100)
    ex.add_argument("--n-eval", type=int, default=300)
    ex.add_argument("--n-sft-helpful", type=int, default=400)
    ex.add_argument("--n-sft-safety", type=int, default=100)
    ex.add_argument("--n-preferences", type=int, default=400)
    ca = sub.add_parser("calibrate", help="print the annotator calibration table")
    ca.add_argument("--seed", type=int, default=0)
    ca.add_argument("--n", type=int, default=150, help="eval prompts per kind")
    ca.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    if args.cmd == "export":
        counts = export(args.out, seed=args.seed, n_tokens=args.n_tokens,
                        n_helpful=args.n_helpful, n_safety=args.n_safety,
                        n_borderline=args.n_borderline, n_eval=args.n_eval,
                        n_sft_helpful=args.n_sft_helpful, n_sft_safety=args.n_sft_safety,
                        n_preferences=args.n_preferences)
        for name, n in counts.items():
            print(f"{Path(args.out) / name}: {n} records")
    else:
        cal = calibration(args.seed, args.n)
        print(json.dumps(cal, indent=2) if args.json else format_table(cal))
