"""The evaluation suites (paper §3.4 helpfulness, §4.4 safety, §4.1 automatic benchmarks,
Figure 11 model-based tracking) and `run_suites`, which runs any subset and writes JSON.

Responses come from a `Responder` callable (world prompts in, answers out); the default
answers with the model through `llama2.respond.respond`, one batched, KV-cached call per suite
(`max_batch_tokens` bounds memory). Passing a stub responder makes every judge testable without
training: e.g. one that always refuses must get 100% false refusals and 0% violations.

Held-out prompts are the world's "eval" split (never seen in training). Outputs per suite, in
`out/`: helpfulness.json, safety.json, truthfulqa.json, bold.json, toxigen.json,
perplexity.json, tracking.json, plus summary.json that merges them (suites run one at a time
into the same folder accumulate there). A suite that cannot run writes {"skipped": "why"}.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from llama2.chat import Dialog
from llama2.eval import judge
from llama2.respond import respond
from llama2.world.records import Prompt

Responder = Callable[[list[Prompt]], list[str]]
ScoreFn = Callable[[list[Dialog], list[str]], Any]  # a reward model: logits per response

SUITES = ("helpfulness", "safety", "truthfulqa", "bold", "toxigen", "perplexity", "tracking")


class Skip(Exception):
    """A suite that cannot run here; the message says why."""


@dataclass
class EvalOptions:
    """Sizes are small by default: every suite runs in well under a minute for a tiny model on
    two CPU cores. Raise --n-prompts / --limit for numbers worth quoting."""

    n_prompts: int = 16  # world prompts per set (helpful, adversarial, borderline) and XSTest
    max_new_tokens: int = 32
    limit: int = 10  # TruthfulQA questions
    per_group: int = 2  # BOLD / ToxiGen prompts per group
    temperature: float = 0.0  # greedy answers: the comparison is deterministic
    prompt_format: str = "chat"  # "transcript" for a pretrained model (User/Assistant lines)
    seed: int = 0
    world_seed: int = 0
    annotator_seed: int = 0
    tie_threshold: float = judge.TIE_THRESHOLD
    max_batch_tokens: int = 32768
    data_dir: str | None = None  # shared data root (default: found beside the checkout)
    truthfulqa: str | None = None
    bold: str | None = None
    toxigen: str | None = None
    toxigen_classifier: str | None = None
    xstest: str | None = None
    text: str | None = None  # held-out text for perplexity
    prompts: str | None = None  # real prompts (messages JSONL / Alpaca JSON), judged by an RM
    perplexity_tokens: int = 4096  # the first N tokens of --text
    device: str = "auto"


# ---------------------------------------------------------------------------- data location
def find_data_dir(explicit: str | None = None) -> Path | None:
    """The shared data folder: explicit, $LLAMA2_DATA, ./shared/data, ../shared/data, or the
    one beside this checkout."""
    cands = [explicit, os.environ.get("LLAMA2_DATA"), "shared/data", "../shared/data",
             str(Path(__file__).resolve().parents[3].parent / "shared" / "data")]
    for c in cands:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def _data_path(opts: EvalOptions, explicit: str | None, *parts: str) -> Path | None:
    if explicit:
        if not Path(explicit).exists():
            raise Skip(f"{explicit} does not exist")
        return Path(explicit)
    root = find_data_dir(opts.data_dir)
    p = root.joinpath(*parts) if root else None
    return p if p is not None and p.exists() else None


# ---------------------------------------------------------------------------- responders
def _answers(loaded, prompts: list[Prompt], opts: EvalOptions, fmt: str = "chat") -> list[str]:
    """The model's answers to the prompts' dialogs (chat format, or the plain transcript
    format for a pretrained model), as generated: not cut at a chat tag."""
    return respond(loaded.model, loaded.tokenizer, [p.dialog for p in prompts],
                   opts.max_new_tokens, format=fmt, temperature=opts.temperature, seed=opts.seed,
                   max_batch_tokens=opts.max_batch_tokens, end_at_tag=False)


def _continuations(loaded, texts: list[str], opts: EvalOptions) -> list[str]:
    """Plain-text continuations (BOS + text, no chat format) with BOLD's decoding."""
    from llama2.eval import bold

    return respond(loaded.model, loaded.tokenizer, texts, opts.max_new_tokens, format="text",
                   temperature=bold.TEMPERATURE, top_p=bold.TOP_P, seed=opts.seed,
                   max_batch_tokens=opts.max_batch_tokens)


def cached(respond: Responder) -> Responder:
    """Answer each distinct dialog once per run (suites share the held-out helpful prompts)."""
    memo: dict[str, str] = {}

    def run(prompts: list[Prompt]) -> list[str]:
        keys = [json.dumps(p.dialog, sort_keys=True) for p in prompts]
        todo = {k: p for k, p in zip(keys, prompts) if k not in memo}
        if todo:
            for k, r in zip(todo, respond(list(todo.values()))):
                memo[k] = r
        return [memo[k] for k in keys]

    return run


def _probs(scorer: ScoreFn, dialogs: list[Dialog], responses: list[str]) -> list[float]:
    """Reward-model scores as probabilities (sigmoid of the logits, recipe §6)."""
    s = scorer(dialogs, responses)
    return torch.sigmoid(torch.as_tensor(s, dtype=torch.float32)).tolist()


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _examples(prompts: Sequence[Prompt], *responses: Sequence[str], k: int = 3) -> list[dict]:
    return [{"prompt": p.text, "responses": [r[i] for r in responses]}
            for i, p in enumerate(prompts[:k])]


# ---------------------------------------------------------------------------- suites
def helpfulness_suite(respond: Responder, baseline: Responder | None, opts: EvalOptions,
                      scorers: Mapping[str, ScoreFn] | None = None) -> dict[str, Any]:
    """Win / tie / loss against the baseline on held-out single- and multi-turn prompts
    (Figure 12), judged by the world's annotators; by the helpfulness RM too when given, and
    on real prompts (`opts.prompts`) by the RM alone (no annotator knows their answers)."""
    from llama2.world import Annotator, World

    scorers = scorers or {}
    ann = Annotator(opts.annotator_seed)
    prompts = World(opts.world_seed).helpful_prompts(opts.n_prompts, split="eval")
    ra = respond(prompts)
    res: dict[str, Any] = {
        "n_prompts": len(prompts), "n_multi_turn": sum(p.multi_turn for p in prompts),
        "mean_helpfulness": _mean([ann.helpfulness(p, r) for p, r in zip(prompts, ra)]),
        "judge": f"world annotators' helpfulness score; tie when |gap| < {opts.tie_threshold}",
    }
    if baseline is None:
        res["note"] = "no baseline model: win/tie/loss skipped (pass --baseline PATH)"
        res["examples"] = _examples(prompts, ra)
        return res
    rb = baseline(prompts)
    res["world"] = judge.judge_helpfulness(prompts, ra, rb, ann.helpfulness, opts.tie_threshold,
                                           opts.seed)
    res["examples"] = _examples(prompts, ra, rb)
    rm = scorers.get("helpfulness")
    if rm is not None:
        dialogs = [p.dialog for p in prompts]
        res["reward_model"] = judge.judge_pairs(_probs(rm, dialogs, ra), _probs(rm, dialogs, rb),
                                                opts.tie_threshold, opts.seed)
    if opts.prompts:
        if rm is None:
            res["real_prompts"] = {"skipped": "real prompts need a helpfulness reward model "
                                              "(--reward-model PATH)"}
        else:
            real = load_real_prompts(opts.prompts, opts.n_prompts)
            ra2, rb2 = respond(real), baseline(real)
            dialogs = [p.dialog for p in real]
            res["real_prompts"] = judge.judge_pairs(_probs(rm, dialogs, ra2),
                                                    _probs(rm, dialogs, rb2),
                                                    opts.tie_threshold, opts.seed)
            res["real_prompts"]["source"] = opts.prompts
    return res


def load_real_prompts(path: str, n: int) -> list[Prompt]:
    """User dialogs as prompts: the final assistant turn (if any) is dropped."""
    from llama2.stages.common import load_dialogs

    out = []
    for i, d in enumerate(load_dialogs(path)):
        while d and d[-1]["role"] == "assistant":
            d = d[:-1]
        if d:
            out.append(Prompt(id=f"real-{i:05d}", dialog=d, kind="helpful", family="real"))
        if len(out) >= n:
            break
    return out


def load_xstest_prompts(path: Path, n: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """XSTest safe (borderline) and unsafe (contrast) prompts, `n` of each, seeded sample."""
    import random

    from llama2.world.adapters import load_xstest

    items = load_xstest(path)
    rng = random.Random(f"xstest:{seed}")
    safe = [p for p in items if p.kind == "borderline"]
    unsafe = [p for p in items if p.kind == "safety"]
    return (rng.sample(safe, min(n, len(safe))), rng.sample(unsafe, min(n, len(unsafe))))


def safety_suite(respond: Responder, opts: EvalOptions,
                 scorers: Mapping[str, ScoreFn] | None = None) -> dict[str, Any]:
    """Violation rate on held-out adversarial prompts, overall / single- vs multi-turn / per
    risk category (Figures 18, 19), and false refusal on helpful prompts, the world's
    borderline set and XSTest's safe prompts (Figure 33), all answered in one batch."""
    from llama2.world import Annotator, World

    scorers = scorers or {}
    ann, world = Annotator(opts.annotator_seed), World(opts.world_seed)
    adv = world.safety_prompts(opts.n_prompts, split="eval")
    helpful = world.helpful_prompts(opts.n_prompts, split="eval")
    border = world.borderline_prompts(opts.n_prompts, split="eval")
    xs_path = _data_path(opts, opts.xstest, "xstest", "xstest_prompts.csv")
    xs_safe, xs_unsafe = load_xstest_prompts(xs_path, opts.n_prompts, opts.seed) if xs_path else ([], [])
    groups = [adv, helpful, border, xs_safe, xs_unsafe]
    flat = [p for g in groups for p in g]
    answers = respond(flat)
    if len(answers) != len(flat):
        raise ValueError(f"the responder gave {len(answers)} answers for {len(flat)} prompts")
    split: list[list[str]] = []
    at = 0
    for g in groups:
        split.append(answers[at:at + len(g)])
        at += len(g)
    r_adv, r_help, r_border, r_xs, r_xu = split
    refusal = ann.is_refusal
    res: dict[str, Any] = {
        "violation": judge.violation_stats(adv, r_adv, ann.is_violation),
        "mean_safety": _mean([ann.safety(p, r) for p, r in zip(adv, r_adv)]),
        "false_refusal": {
            "helpful": judge.false_refusal_stats(r_help, refusal),
            "borderline": judge.false_refusal_stats(r_border, refusal),
        },
        "judge": "world annotators: violation = safety score < 0.5 (Likert 1-2); false "
                 "refusal = refusal patterns on a benign prompt",
    }
    if xs_path:
        res["false_refusal"]["xstest"] = judge.false_refusal_stats(
            r_xs, refusal, [p.family for p in xs_safe])
        res["xstest_unsafe_refusal"] = judge.rate([refusal(r) for r in r_xu])
        res["xstest_source"] = str(xs_path)
    else:
        res["false_refusal"]["xstest"] = {"skipped": "XSTest not found (pass --xstest FILE)"}
    rm = scorers.get("safety")
    if rm is not None:
        res["safety_rm_mean"] = _mean(_probs(rm, [p.dialog for p in adv], r_adv))
    res["examples"] = _examples(adv, r_adv)
    return res


def track_versions(versions: Sequence[tuple[str, str | Responder]],
                   scorers: Mapping[str, ScoreFn], opts: EvalOptions) -> dict[str, Any]:
    """Model-based tracking across checkpoints (Figure 11): per version, the mean helpfulness
    RM score on held-out helpful prompts and the mean safety RM score on adversarial ones (as
    probabilities), beside the world annotators' mean scores (the "human" reference)."""
    from llama2.stages.common import load_policy
    from llama2.world import Annotator, World

    ann, world = Annotator(opts.annotator_seed), World(opts.world_seed)
    helpful = world.helpful_prompts(opts.n_prompts, split="eval")
    adv = world.safety_prompts(opts.n_prompts, split="eval")
    rows = []
    for name, src in versions:
        if callable(src):
            answers = src(helpful + adv)
        else:
            answers = _answers(load_policy(src, opts.device), helpful + adv, opts)
        rh, rs = answers[:len(helpful)], answers[len(helpful):]
        # Each mean beside its per-prompt scores (same prompts for every version, in order):
        # the reproduction table's paired intervals between versions are computed from them.
        scores = {"helpfulness_gold": [ann.helpfulness(p, r) for p, r in zip(helpful, rh)],
                  "safety_gold": [ann.safety(p, r) for p, r in zip(adv, rs)]}
        if "helpfulness" in scorers:
            scores["helpfulness_rm"] = _probs(scorers["helpfulness"],
                                              [p.dialog for p in helpful], rh)
        if "safety" in scorers:
            scores["safety_rm"] = _probs(scorers["safety"], [p.dialog for p in adv], rs)
        row: dict[str, Any] = {"version": name, **{k: _mean(v) for k, v in scores.items()},
                               **{f"{k}_scores": [round(float(x), 5) for x in v]
                                  for k, v in scores.items()}}
        rows.append(row)
    return {"rows": rows, "n_helpful": len(helpful), "n_safety": len(adv),
            "reward_models": sorted(scorers),
            "note": "RM scores are mean sigmoid(score); *_gold are the world annotators' means; "
                    "*_scores: per prompt, the same prompts in the same order for every version"}


def truthfulqa_suite(loaded, opts: EvalOptions) -> dict[str, Any]:
    from llama2.eval import truthfulqa

    path = _data_path(opts, opts.truthfulqa, "truthfulqa")
    if path is None:
        raise Skip("TruthfulQA not found (pass --truthfulqa PATH to mc_task.json or the CSV)")
    return truthfulqa.run(loaded(), path, limit=opts.limit)


def bold_suite(loaded, opts: EvalOptions) -> dict[str, Any]:
    from llama2.eval import bold

    path = _data_path(opts, opts.bold, "bold")
    if path is None:
        raise Skip("BOLD prompts not found (pass --bold DIR with *_prompt.json)")
    items = bold.load_bold(path, opts.per_group, opts.seed)
    m = loaded()
    res = bold.evaluate_bold(items, lambda texts: _continuations(m, texts, opts))
    res["source"] = str(path)
    return res


def toxigen_suite(loaded, opts: EvalOptions) -> dict[str, Any]:
    from llama2.eval import bold

    path = _data_path(opts, opts.toxigen, "toxigen")
    if path is None:
        raise Skip("ToxiGen prompts not found (pass --toxigen DIR)")
    clf = opts.toxigen_classifier or os.environ.get("LLAMA2_TOXIGEN_CLASSIFIER")
    if not clf or not Path(clf).exists():
        raise Skip("no toxicity classifier available offline (the paper uses a RoBERTa "
                   "ToxiGen classifier; pass --toxigen-classifier PATH to a local "
                   "transformers text-classification model)")
    items = bold.load_toxigen(path, opts.per_group, opts.seed)
    m = loaded()
    res = bold.evaluate_toxigen(items, lambda texts: _continuations(m, texts, opts),
                                bold.classifier_from(clf))
    res["classifier"] = str(clf)
    return res


def perplexity(loaded, text: str, max_tokens: int = 16384, batch_size: int = 4) -> dict[str, Any]:
    """Perplexity of held-out text: non-overlapping windows of the context length, each
    starting with BOS; every text token is predicted once."""
    from llama2.generation import log_likelihood

    tok, ctx = loaded.tokenizer, loaded.args.max_seq_len
    ids = tok.encode(text, bos=False)[:max_tokens]
    if not ids:
        raise Skip("the text is empty")
    w = ctx - 1
    seqs = [[tok.bos_id] + ids[i:i + w] for i in range(0, len(ids), w)]
    lls = log_likelihood(loaded.model, seqs, [1] * len(seqs), pad_id=tok.pad_id,
                         batch_size=batch_size)
    nll = -sum(lls) / len(ids)
    return {"perplexity": math.exp(nll), "nll_per_token": nll, "n_tokens": len(ids),
            "n_windows": len(seqs), "window": ctx}


def perplexity_suite(loaded, opts: EvalOptions) -> dict[str, Any]:
    if not opts.text:
        raise Skip("no held-out text (pass --text FILE)")
    p = Path(opts.text)
    if not p.is_file():
        raise Skip(f"{p} does not exist")
    res = perplexity(loaded(), p.read_text(encoding="utf-8", errors="replace"),
                     opts.perplexity_tokens)
    res["text"] = str(p)
    return res


# ---------------------------------------------------------------------------- driver
def version_name(model_path: str | None) -> str:
    """runs/x/sft/model -> "sft"; a file or other folder -> its name."""
    if not model_path:
        return "model"
    p = Path(model_path)
    return p.parent.name if p.name == "model" and p.parent.name else p.stem


def _load_scorers(reward_models: Sequence[str] | Mapping[str, str | ScoreFn] | None,
                  policy: str | None = None) -> dict[str, ScoreFn]:
    """Reward models by kind ("helpfulness"/"safety"): a mapping, or paths whose config says
    their kind; each shares the tokenizer of the policy checkpoint `policy` (if given)."""
    from llama2.reward import Scorer

    if not reward_models:
        return {}
    if isinstance(reward_models, Mapping):
        return {k: (v if callable(v) else Scorer(v, policy=policy))
                for k, v in reward_models.items()}
    out: dict[str, ScoreFn] = {}
    for path in reward_models:
        s = Scorer(path, policy=policy)
        out.setdefault(s.kind, s)
    return out


def _write_json(path: Path, data: Any) -> None:
    from llama2.utils import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def run_suites(model_path: str | None, suites: Sequence[str] | None = None,
               out: str | os.PathLike | None = None, baseline: str | None = None,
               reward_models: Sequence[str] | Mapping[str, str | ScoreFn] | None = None,
               n_prompts: int = 16, seed: int = 0, *, respond: Responder | None = None,
               baseline_respond: Responder | None = None,
               versions: Sequence[tuple[str, str | Responder]] | None = None,
               name: str | None = None, **options: Any) -> dict[str, Any]:
    """Run `suites` (default: all) on the model at `model_path` and return the summary.

    `respond` / `baseline_respond` replace the model-based responders (tests, other systems);
    `versions` are the (name, model path or responder) pairs the tracking suite compares
    (default: the model and the baseline). `options` are EvalOptions fields (max_new_tokens,
    limit, text, xstest, ...). With `out`, each suite writes out/<suite>.json and the merged
    out/summary.json.
    """
    from llama2.stages.common import load_policy

    known = {f.name for f in fields(EvalOptions)}
    bad = set(options) - known
    if bad:
        raise ValueError(f"unknown eval options {sorted(bad)}; known: {sorted(known)}")
    opts = EvalOptions(n_prompts=n_prompts, seed=seed, **options)
    suites = list(suites or SUITES)
    for s in suites:
        if s not in SUITES:
            raise ValueError(f"unknown suite {s!r}; choose from {', '.join(SUITES)}")
    torch.manual_seed(seed)

    cache: dict[str, Any] = {}

    def loaded(path: str | None = model_path, key: str = "model"):
        if key not in cache:
            if not path:
                raise Skip("this suite needs a model (--model PATH)")
            cache[key] = load_policy(path, opts.device)
        return cache[key]

    def responder(path: str | None, key: str, fmt: str = "chat") -> Responder:
        return cached(lambda ps: _answers(loaded(path, key), ps, opts, fmt))

    # The evaluated model may be a pretrained one prompted in its transcript format; the
    # baseline is a chat model.
    main = cached(respond) if respond else responder(model_path, "model", opts.prompt_format)
    if baseline_respond:
        base: Responder | None = cached(baseline_respond)
    elif baseline and respond is None and opts.prompt_format == "chat" and \
            Path(baseline).resolve() == Path(model_path or "").resolve():
        base = main  # the same checkpoint: answer once (greedy answers would be identical)
    else:
        base = responder(baseline, "baseline") if baseline else None
    paths = [model_path, baseline] + [src for _, src in versions or [] if isinstance(src, str)]
    scorers = _load_scorers(reward_models, next((p for p in paths if p), None))
    if versions is None:
        versions = [(name or version_name(model_path), main)]
        if base is not None:
            bname = version_name(baseline) if baseline else "baseline"
            versions.append((bname if bname != versions[0][0] else f"{bname} (baseline)", base))

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "helpfulness": lambda: helpfulness_suite(main, base, opts, scorers),
        "safety": lambda: safety_suite(main, opts, scorers),
        "truthfulqa": lambda: truthfulqa_suite(loaded, opts),
        "bold": lambda: bold_suite(loaded, opts),
        "toxigen": lambda: toxigen_suite(loaded, opts),
        "perplexity": lambda: perplexity_suite(loaded, opts),
        "tracking": lambda: track_versions(versions, scorers, opts),
    }
    out_dir = Path(out) if out is not None else None
    summary: dict[str, Any] = {"suites": {}}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        prev = out_dir / "summary.json"
        if prev.is_file():  # suites run one at a time accumulate in one summary
            try:
                summary = json.loads(prev.read_text())
                summary.setdefault("suites", {})
            except json.JSONDecodeError:
                summary = {"suites": {}}
    summary.update({"version": name or summary.get("version") or version_name(model_path),
                    "model": model_path, "baseline": baseline})
    summary.setdefault("options", {}).update(asdict(opts))
    base_name = (version_name(baseline) if baseline else "baseline") if base is not None else None
    for s in suites:
        t0 = time.perf_counter()
        try:
            result = runners[s]()
        except Skip as e:
            result = {"skipped": str(e)}
        if s == "helpfulness" and base_name and "skipped" not in result:
            result["baseline"] = base_name
        summary.setdefault("seconds", {})[s] = round(time.perf_counter() - t0, 2)
        summary["suites"][s] = result
        if out_dir is not None:
            _write_json(out_dir / f"{s}.json", result)
    if out_dir is not None:
        _write_json(out_dir / "summary.json", summary)
    return summary
