"""The main job: from nothing to an aligned baby Llama 2-Chat and its evaluation report.

    llama2 pipeline [--config FILE.toml] [--out runs/NAME] [--quick] [--section.key value ...]
    llama2 pipeline --config FILE.toml --dry-run [--gpus 8] [--gpu-memory 80] [--frozen sharded]
        prints each stage's memory per GPU (llama2/plan.py) and exits, writing nothing

On the embedded default (the built-in world, no network, 2 CPU cores) it runs, in order:
world data -> tokenizer -> pretraining -> SFT (helpfulness + safety demonstrations) ->
iterative RLHF rounds (preferences, both reward models, rejection sampling, then PPO) plus
the reward-model ablations -> Ghost Attention -> targeted safety context distillation ->
safety data scaling -> red teaming -> evaluation of every model version -> report.
Every stage writes into its own folder of the run directory, then its marker (contract.py):
a stage done with the same settings is skipped, so a killed pipeline started again resumes at
the stage (and, inside the training stages, the step) where it stopped; a stage whose settings
changed, or whose inputs were re-made, runs again after a one-line notice naming the keys.
pipeline_config.json is written last and so always describes the run directory's artefacts.
Any stage can also run alone with its own command.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from llama2 import config as config_mod
from llama2.engine import distributed
from llama2.stages.contract import MARKER, SUFFIX, Stage, changed_keys, notice, prune
from llama2.stages.distill import DistillConfig
from llama2.stages.gatt import GAttConfig
from llama2.stages.pretrain import PretrainConfig
from llama2.stages.reward import RewardConfig
from llama2.stages.rlhf import RLHFConfig
from llama2.stages.safety import SafetyScalingConfig
from llama2.stages.sft import SFTConfig
from llama2.utils import atomic_write_text


@dataclass
class WorldSection:
    seed: int = 0
    n_tokens: int = 2_000_000  # pretraining corpus size (approximate tokens)
    tokenizer_vocab_size: int = 1024


@dataclass
class AblationSection:
    """Reward-model ablations trained on the first preference batch (Tables 28, 29)."""

    enabled: bool = True
    margins: list[str] = field(default_factory=lambda: ["none", "small", "large"])


@dataclass
class RedTeamSection:
    enabled: bool = True
    n_tries: int = 1000  # adversarial prompts per model version


@dataclass
class EvalSection:
    n_prompts: int = 200
    max_new_tokens: int = 48
    truthfulqa_limit: int = 100
    suites: list[str] = field(default_factory=lambda: ["helpfulness", "safety"])


@dataclass
class PipelineConfig:
    out: str = "runs/tiny"
    seed: int = 0
    world: WorldSection = field(default_factory=WorldSection)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)
    ablation: AblationSection = field(default_factory=AblationSection)
    gatt: GAttConfig = field(default_factory=GAttConfig)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(also_ungated=True))
    scaling: SafetyScalingConfig = field(default_factory=SafetyScalingConfig)
    redteam: RedTeamSection = field(default_factory=RedTeamSection)
    eval: EvalSection = field(default_factory=EvalSection)


def packaged_config(name: str) -> dict:
    text = resources.files("llama2").joinpath("configs", f"{name}.toml").read_text()
    import tomllib

    return tomllib.loads(text)


def parse_args(argv: list[str]) -> PipelineConfig:
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    defaults = packaged_config("tiny")
    if quick:
        defaults = config_mod._merge(defaults, packaged_config("quick"))
    return config_mod.parse(PipelineConfig, argv, defaults=defaults)


class Progress:
    """Names the stage, its number, the time spent and an ETA.

    Each stage has an expected share of the run (minutes on the default config, 2 cores); the
    ETA scales the remaining shares by how fast the finished ones went, once enough is done to
    tell, and is the plain expectation before that."""

    def __init__(self, stages: list[tuple[str, float]]):
        self.stages, self.t0 = stages, time.perf_counter()
        self.total = sum(w for _, w in stages)
        self.done_weight, self.done_time = 0.0, 0.0

    def start(self, i: int) -> None:
        name, _ = self.stages[i]
        elapsed = time.perf_counter() - self.t0
        left = self.total - self.done_weight
        speed = self.done_time / self.done_weight if self.done_weight >= 0.2 * self.total else 60.0
        print(f"\n=== [{i + 1}/{len(self.stages)}] {name} (elapsed {elapsed / 60:.1f} min, "
              f"ETA {left * speed / 60:.1f} min)", file=sys.stderr, flush=True)
        self._t = time.perf_counter()

    def finish(self, i: int, skipped: bool) -> None:
        if skipped:  # a skipped stage costs nothing: drop it from the estimate
            self.total -= self.stages[i][1]
        else:
            self.done_weight += self.stages[i][1]
            self.done_time += time.perf_counter() - self._t


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.versions: dict[str, str] = {}  # model version -> checkpoint path
        self.rounds: list[dict] = []
        self.markers: dict[str, Path] = {}  # stage -> its marker, for the report's inputs

    # -------------------------------------------------------------------- stages
    # Each returns True when its marker says it is done with these settings (contract.py).
    def _stage(self, key: str, marker: Path, config: dict, inputs: dict | None = None,
               outputs: list[Path] | None = None) -> Stage:
        self.markers[key] = marker
        return Stage(marker, config, inputs, outputs)

    def world(self) -> bool:
        w = self.cfg.world
        corpus = self.out / "world" / "corpus.txt"

        def body() -> None:
            from llama2.world import World

            docs = World(w.seed).corpus(w.n_tokens)
            atomic_write_text(corpus, "\n\n".join(d.replace("\n\n", "\n") for d in docs) + "\n")

        # Seconds of work that only rank 0 writes: the other ranks wait instead of redoing it.
        return self._stage("world", corpus.parent / MARKER,
                           {"world": {"seed": w.seed, "n_tokens": w.n_tokens}}).run(
            lambda: distributed.on_rank0(body))

    def tokenizer(self) -> bool:
        path = self.out / "tokenizer.model"

        def body() -> None:
            from llama2.data.pretrain import iter_corpus
            from llama2.tokenizer import train_tokenizer

            train_tokenizer(iter_corpus([str(self.out / "world" / "corpus.txt")]), path,
                            vocab_size=self.cfg.world.tokenizer_vocab_size)

        return self._stage("tokenizer", self.out / f"tokenizer{SUFFIX}",
                           {"world": {"tokenizer_vocab_size": self.cfg.world.tokenizer_vocab_size}},
                           {"corpus": self.markers["world"]}, [path]).run(
            lambda: distributed.on_rank0(body))

    def pretrain(self) -> bool:
        from llama2.stages.pretrain import run

        out = self.out / "pretrain"
        self.versions["pretrain"] = str(out / "model")
        pc = copy.deepcopy(self.cfg.pretrain)
        pc.run_dir = str(out)
        pc.data.input = [str(self.out / "world" / "corpus.txt")]
        pc.data.tokenizer = str(self.out / "tokenizer.model")
        pc.train.resume = True
        stage = self._stage("pretrain", out / MARKER, {"pretrain": pc},
                            {"pretrain.data.input": [self.markers["world"]],
                             "pretrain.data.tokenizer": self.markers["tokenizer"]})
        return stage.run(lambda: run(pc))

    def sft(self) -> bool:
        out = self.out / "sft"
        self.versions["sft"] = str(out / "model")
        sc = copy.deepcopy(self.cfg.sft)
        sc.model, sc.out, sc.world_seed = self.versions["pretrain"], str(out), self.cfg.world.seed
        sc.train.resume = True

        def body() -> None:
            from llama2.stages.common import load_policy
            from llama2.stages.sft import finetune, gather_dialogs

            loaded = load_policy(sc.model, sc.train.device)
            finetune(loaded.model, loaded.tokenizer, gather_dialogs(sc), sc.out, sc.train,
                     sc.seq_len, sc.val_fraction, sc.learn, config=sc, extra={"stage": "sft"})

        return self._stage("sft", out / MARKER, {"sft": sc}, {"sft.model": sc.model}).run(body)

    def rlhf(self) -> bool:
        """The rounds; each sub-stage checks its own marker (rlhf.py), this one the whole."""
        from llama2.stages.rlhf import round_record, run

        rc = copy.deepcopy(self.cfg.rlhf)
        rc.sft, rc.base = self.versions["sft"], self.versions["pretrain"] + "#transcript"
        rc.out, rc.world_seed = str(self.out / "rlhf"), self.cfg.world.seed
        stage = self._stage("rlhf", self.out / "rlhf" / MARKER, {"rlhf": rc},
                            {"rlhf.sft": rc.sft, "rlhf.base": rc.base}, outputs=[])
        done = stage.done()
        if done:  # where they are in this run directory, wherever it was made
            records = [round_record(rc, v) for v in range(1, rc.rounds + 1)]
        else:
            records = run(rc)
            stage.finish()
        for r in records:
            self.versions[f"rlhf_v{r['round']}"] = r["model"]
        self.rounds = records
        self.latest_rlhf = records[-1]["model"]
        return done

    def rm_ablation(self) -> bool:
        """Margin (Table 28) and auxiliary safety loss (Table 29) ablations, trained and
        evaluated on the same pairs in this run; each variant is a stage of its own."""
        from llama2.stages.rlhf import batch_marker, train_rm

        out = self.out / "rm_ablation"
        if not self.cfg.ablation.enabled:
            Stage(out / MARKER, {}).remove()
            return True
        prefs = self.out / "rlhf" / "preferences"
        helpful, safety = [str(prefs / "helpful_batch_0.jsonl")], [str(prefs / "safety_batch_0.jsonl")]
        held = {"helpfulness": [str(prefs / "eval_helpful_batch_0.jsonl")],
                "safety": [str(prefs / "eval_safety_batch_0.jsonl")]}
        batches = [batch_marker(prefs, 0)]
        variants = [("helpfulness", f"margin_{m}", m, False) for m in self.cfg.ablation.margins]
        variants += [("safety", "safety_no_aux", "small", False), ("safety", "safety_aux", "small", True)]
        ablation = {"ablation": self.cfg.ablation, "helpful_rm": self.cfg.rlhf.helpful_rm,
                    "safety_rm": self.cfg.rlhf.safety_rm}
        whole = self._stage("rm_ablation", out / MARKER, ablation,
                            {"sft": self.versions["sft"], "preferences": batches}, outputs=[])
        if whole.done():
            return True
        prune(out, [name for _, name, _, _ in variants])
        for kind, name, margin, aux in variants:
            section = "helpful_rm" if kind == "helpfulness" else "safety_rm"
            rc: RewardConfig = copy.deepcopy(getattr(self.cfg.rlhf, section))
            rc.margin, rc.aux_safety_loss = margin, aux
            heldout = [p for p in held[kind] if Path(p).is_file()]
            # The variant with the rounds' own settings is round 1's RM: the same stage, copied.
            train_rm(section, rc, self.versions["sft"], out / name, helpful, safety, heldout,
                     batches, [batch_marker(prefs, 0, "eval")] if heldout else [],
                     twin=self.out / "rlhf" / "v1" / f"rm_{section.removesuffix('_rm')}")
        whole.finish()
        return False

    def gatt(self) -> bool:
        from llama2.stages.gatt import run

        out = self.out / "gatt"
        self.versions["gatt"] = str(out / "model")
        gc = copy.deepcopy(self.cfg.gatt)
        gc.model, gc.out, gc.world_seed = self.latest_rlhf, str(out), self.cfg.world.seed
        # Replay the RLHF rounds' picks, not the SFT demonstrations, so GAtt keeps what RLHF taught.
        gc.replay.picks = [r["best"] for r in self.rounds]
        gc.train.resume = True
        return self._stage("gatt", out / MARKER, {"gatt": gc},
                           {"gatt.model": gc.model, "gatt.replay.picks": gc.replay.picks}).run(
            lambda: run(gc))

    def distill(self) -> bool:
        """Targeted context distillation on the GAtt model, gated by the last Safety RM; the
        ungated variant is trained beside it for Figure 16."""
        from llama2.stages.distill import run

        out = self.out / "distill"
        self.versions["final"] = str(out / "model")
        dc = copy.deepcopy(self.cfg.distill)
        dc.model, dc.out, dc.world_seed = self.versions["gatt"], str(out), self.cfg.world.seed
        dc.safety_rm = self.rounds[-1]["rm_safety"]
        dc.replay.picks = [r["best"] for r in self.rounds]
        dc.train.resume = True
        return self._stage("distill", out / MARKER, {"distill": dc},
                           {"distill.model": dc.model, "distill.safety_rm": dc.safety_rm,
                            "distill.replay.picks": dc.replay.picks}).run(lambda: run(dc))

    def safety_scaling(self) -> bool:
        """Figure 15; each share's SFT model is a stage of its own (safety.train_share)."""
        from llama2.stages.safety import safety_scaling

        sc = copy.deepcopy(self.cfg.scaling)
        sc.model, sc.out = self.versions["pretrain"], str(self.out)
        sc.sft = copy.deepcopy(self.cfg.sft)
        sc.sft.world_seed, sc.sft.out = self.cfg.world.seed, str(self.out / "sft")
        sc.sft.train.resume = True
        stage = self._stage("safety_scaling", self.out / f"safety_scaling{SUFFIX}",
                            {"scaling": sc}, {"scaling.model": sc.model},
                            [self.out / "safety_scaling.json", self.out / "safety_scaling.png"])
        return stage.run(lambda: safety_scaling(sc))

    def red_team(self) -> bool:
        from llama2.stages.redteam import red_team

        names = ["sft"] + [f"rlhf_v{r['round']}" for r in self.rounds] + ["final"]
        outputs = [self.out / f for f in ("redteam.json", "redteam.png", "redteam_violations.jsonl")]
        rt = self.cfg.redteam
        if not rt.enabled:
            Stage(self.out / f"redteam{SUFFIX}", {}, outputs=outputs).remove()
            return True
        stage = self._stage("redteam", self.out / f"redteam{SUFFIX}",
                            {"redteam": rt, "seed": self.cfg.seed, "versions": names},
                            {n: self.versions[n] for n in names}, outputs)
        return stage.run(lambda: red_team([(n, self.versions[n]) for n in names], self.out,
                                          n_tries=rt.n_tries, seed=self.cfg.seed))

    def evaluate(self) -> bool:
        """Every model version against the SFT model: helpfulness win rate and safety (the
        world's annotators as the human raters), TruthfulQA on SFT and final, and the
        model-based tracking of Figure 11 with the last round's reward models. Each version,
        and the tracking, is a stage of its own."""
        from llama2.eval import run_suites

        ev, out = self.cfg.eval, self.out / "eval"
        sft = self.versions["sft"]
        rms = [self.rounds[-1]["rm_helpful"], self.rounds[-1]["rm_safety"]] if self.rounds else []
        whole = self._stage("eval", out / MARKER, {"eval": ev, "seed": self.cfg.seed},
                            {**self.versions, "reward_models": rms}, outputs=[])
        if whole.done():
            return True
        prune(out, list(self.versions) + (["tracking"] if rms else []))
        for name, path in self.versions.items():
            suites = list(ev.suites)
            if name in ("sft", "final") and "truthfulqa" not in suites:
                suites.append("truthfulqa")
            # A pretrained model is asked in its own transcript format (it knows no [INST]).
            fmt = "transcript" if name == "pretrain" else "chat"
            settings = {"suites": suites, "n_prompts": ev.n_prompts, "seed": self.cfg.seed,
                        "max_new_tokens": ev.max_new_tokens, "limit": ev.truthfulqa_limit,
                        "prompt_format": fmt}
            stage = Stage(out / name / MARKER, {"eval": settings}, {"model": path, "baseline": sft})
            if not stage.done():
                run_suites(path, suites, out / name, baseline=sft, n_prompts=ev.n_prompts,
                           seed=self.cfg.seed, name=name, max_new_tokens=ev.max_new_tokens,
                           limit=ev.truthfulqa_limit, prompt_format=fmt)
                stage.finish()
        if rms:
            stage = Stage(out / "tracking" / MARKER,
                          {"eval": {"n_prompts": ev.n_prompts, "seed": self.cfg.seed,
                                    "max_new_tokens": ev.max_new_tokens, "versions": list(self.versions)}},
                          {**self.versions, "reward_models": rms},
                          [out / "tracking", out / "tracking.json"])

            def tracking() -> None:
                run_suites(None, ["tracking"], out / "tracking", n_prompts=ev.n_prompts,
                           seed=self.cfg.seed, reward_models=rms,
                           versions=list(self.versions.items()), max_new_tokens=ev.max_new_tokens)
                if distributed.is_main():  # the one that wrote it moves it
                    (out / "tracking" / "tracking.json").replace(out / "tracking.json")

            stage.run(tracking)
        whole.finish()
        return False

    def report(self) -> bool:
        """The reproduction table and the report, from every other stage's results."""
        from llama2.eval.report import build_report
        from llama2.eval.run_layout import RunLayout
        from llama2.stages.reproduction import reproduction_table

        layout = RunLayout(self.out)
        atomic_write_text(layout.versions_path, json.dumps(self.versions, indent=2) + "\n")
        table = layout.reproduction_path
        outputs = [table, self.out / "report.md", self.out / "report.html",
                   self.out / "report_plots"]
        stage = Stage(self.out / f"report{SUFFIX}", {"versions": list(self.versions)},
                      dict(self.markers), outputs)

        def body() -> None:
            atomic_write_text(table, json.dumps(reproduction_table(self.out), indent=2) + "\n")
            build_report(self.out)

        done = stage.run(lambda: distributed.on_rank0(body))  # reading files, drawing plots
        print("\nreproduction of the paper's findings:", file=sys.stderr)
        for r in layout.reproduction():
            mark = "yes" if r["reproduced"] else "NO "
            print(f"  [{mark}] {r['finding']}: {r['measured']}", file=sys.stderr)
        return done

    # -------------------------------------------------------------------- driver
    def stage_list(self) -> list[tuple[str, Callable[[], bool], float]]:
        return [
            ("world data", self.world, 0.1),
            ("tokenizer", self.tokenizer, 0.1),
            ("pretraining", self.pretrain, 5),
            ("SFT", self.sft, 0.5),
            ("RLHF rounds (preferences, reward models, rejection sampling, PPO)", self.rlhf, 5),
            ("reward-model ablations", self.rm_ablation, 1.5),
            ("Ghost Attention", self.gatt, 2),
            ("context distillation (gated and ungated)", self.distill, 1.5),
            ("safety data scaling", self.safety_scaling, 2),
            ("red teaming", self.red_team, 0.5),
            ("evaluation", self.evaluate, 2),
            ("report", self.report, 0.2),
        ]

    def run(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        # pipeline_config.json describes the artefacts: settings that differ from it take it
        # away until every stage has been checked against them (and re-run where it must).
        saved = self.out / "pipeline_config.json"
        requested = json.loads(json.dumps(config_mod.to_dict(self.cfg), default=str))
        if saved.is_file() and distributed.is_main():  # rank 0 removes; the stages then agree
            old = json.loads(saved.read_text())
            if old != requested:
                keys = changed_keys(old, requested)
                notice(f"{saved}: settings changed (keys: {', '.join(keys)}); the stages they "
                       "touch re-run")
                saved.unlink()
        stages = self.stage_list()
        progress = Progress([(name, w) for name, _, w in stages])
        # Seconds per stage, written after each one; a stage skipped on resume keeps the time
        # of the run that did it.
        times_path = self.out / "stage_times.json"
        times = json.loads(times_path.read_text()) if times_path.is_file() else {}
        for i, (name, fn, _) in enumerate(stages):
            progress.start(i)
            t = time.perf_counter()
            skipped = fn()
            if not skipped or name not in times:
                times[name] = round(time.perf_counter() - t, 1)
            atomic_write_text(times_path, json.dumps(times, indent=2) + "\n")
            progress.finish(i, skipped)
            if skipped:
                print("    (already done: skipped)", file=sys.stderr)
        config_mod.save(self.cfg, saved)  # last: every stage now matches these settings


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if "--dry-run" in argv:  # the memory plan per stage and GPU (llama2/plan.py); writes nothing
        from llama2.plan import main as plan_main

        plan_main(argv)
        return
    from llama2.stages.common import launch

    # Every rank runs the pipeline: each stage shares its work by the rule of
    # engine/distributed.py, and its marker is rank 0's (contract.py).
    cfg = launch(parse_args(argv))
    Pipeline(cfg).run()
    print(f"done: run directory {cfg.out}")
