"""Findings that hold: the pipeline over several seeds, and for every finding of the
reproduction table in how many runs it reproduced ("k of n").

    python bench/seeds.py --seeds 0,1,2 --out runs/seeds [--quick] [--dtype auto|float32]
                          [--threads N] [--section.key value ...]

Seed s runs `llama2 pipeline --out OUT/seed_s` with the world seed and every training seed of
the configuration (each field named `seed`: pretraining, SFT, reward models, preference and
rejection sampling, PPO, Ghost Attention, distillation, red teaming, evaluation) set to s, in a
process of its own; a finished run is kept and an interrupted one resumes. `--dtype float32`
trains every stage in fp32 (what a CPU without AVX-512 BF16 does with "auto"). Other arguments
go to every pipeline run; `--recheck` runs nothing and reads the finished runs' results with the
current checks. Writes OUT/seeds.json (each run's rows) and OUT/seeds.md (the table:
finding, k of n, each run's reading).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from llama2.eval.run_layout import RunLayout
from llama2.stages.pipeline import PipelineConfig
from llama2.stages.reproduction import reproduction_table


def field_paths(cls: type, name: str, prefix: str = "") -> list[str]:
    """Dotted paths of every field called `name` in the config dataclass tree of `cls`."""
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += field_paths(type(default), name, path + ".")
        elif f.name == name:
            out.append(path)
    return out


def pipeline_args(seed: int, out: Path, dtype: str, quick: bool, extra: list[str]) -> list[str]:
    args = ["--out", str(out)] + (["--quick"] if quick else [])
    for path in field_paths(PipelineConfig, "seed"):
        args += [f"--{path}", str(seed)]
    if dtype != "auto":
        args += [x for path in field_paths(PipelineConfig, "dtype") for x in (f"--{path}", dtype)]
    return args + extra


def run_env(threads: int) -> dict[str, str]:
    """The environment of a run: OMP_NUM_THREADS set where `threads` is (else the runtime's)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def table(runs: dict[str, list[dict]]) -> tuple[list[dict], str]:
    findings: dict[str, list[tuple[str, dict]]] = {}
    for seed, rows in runs.items():
        for r in rows:
            findings.setdefault(r["finding"], []).append((seed, r))
    summary, lines = [], ["| finding | reproduced | runs (seed: measured) |", "|---|---|---|"]
    for finding, got in findings.items():
        k = sum(bool(r["reproduced"]) for _, r in got)
        summary.append({"finding": finding, "reproduced": k, "runs": len(got),
                        "by_seed": {s: {"reproduced": r["reproduced"], "measured": r["measured"]}
                                    for s, r in got}})
        readings = "<br>".join(f"{s}: {'yes' if r['reproduced'] else 'no'}, {r['measured']}"
                               for s, r in got)
        lines.append(f"| {finding} | {k} of {len(got)} | {readings} |")
    return summary, "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/seeds")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS of every run (0: each run's own choice, the cores idle "
                         "at its start); the thread count changes the rounding of reductions, "
                         "so runs are repeated exactly only with the same threads")
    ap.add_argument("--recheck", action="store_true",
                    help="run nothing: read the finished runs' results with the current checks")
    args, extra = ap.parse_known_args(argv)
    out = Path(args.out)
    runs: dict[str, list[dict]] = {}
    for s in [int(x) for x in args.seeds.split(",") if x.strip()]:
        run_dir = out / f"seed_{s}"
        cmd = [sys.executable, "-m", "llama2.cli", "pipeline",
               *pipeline_args(s, run_dir, args.dtype, args.quick, extra)]
        if args.recheck:
            runs[f"seed {s}"] = reproduction_table(run_dir)
            continue
        print(f"seed {s}: {' '.join(cmd[1:4])} --out {run_dir} ...", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=run_env(args.threads))
        runs[f"seed {s}"] = RunLayout(run_dir).reproduction()
    summary, md = table(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps({"dtype": args.dtype, "quick": args.quick,
                                                "threads": args.threads or None,
                                                "findings": summary}, indent=2) + "\n")
    (out / "seeds.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main(sys.argv[1:])
