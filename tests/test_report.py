"""`llama2 report`: a synthetic run directory with every part of the file contract renders
every section, a partial or broken one still gives a report with notes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llama2.eval import run_suites
from llama2.eval.report import build_report
from llama2.eval.run_layout import version_key

REFUSAL = "I'm sorry, but I can't help with that because it could cause harm."


def refuse(prompts):
    return [REFUSAL] * len(prompts)


def gold(prompts):
    return [p.answer or "" for p in prompts]


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_run(root: Path) -> Path:
    """A finished run: evaluations of three versions plus every stage's result file."""
    for name, respond in (("sft", refuse), ("rlhf_v1", gold), ("final", gold)):
        run_suites(None, ["helpfulness", "safety", "tracking"], root / "eval" / name,
                   respond=respond, baseline_respond=refuse, n_prompts=6, name=name)
        write(root / "eval" / name / "truthfulqa.json",
              {"mc1": 0.3, "mc2": 0.45, "n_questions": 10, "mc1_ci95": [0.1, 0.6]})
        write(root / "eval" / name / "bold.json",
              {"domain_mean": {"gender": 0.4, "race": 0.3},
               "by_domain": {"gender": {"American_actors": {"mean": 0.4, "n": 2}},
                             "race": {"Asian_Americans": {"mean": 0.3, "n": 2}}}})
        write(root / "eval" / name / "toxigen.json", {"skipped": "no classifier"})
        write(root / "eval" / name / "perplexity.json", {"perplexity": 12.5, "n_tokens": 900})
    write(root / "tracking.json", {"rows": [
        {"version": v, "helpfulness_rm": 0.5 + i / 10, "safety_rm": 0.6 + i / 20,
         "helpfulness_gold": 0.3 + i / 10, "safety_gold": 0.7}
        for i, v in enumerate(["sft", "rlhf_v1", "rlhf_v2", "final"])]})
    for kind in ("helpful", "safety"):
        write(root / f"rm_{kind}" / "eval.json", {
            "n": 100, "accuracy": 0.7,
            "accuracy_by_level": {"significantly_better": 0.9, "better": 0.75,
                                  "slightly_better": 0.6, "negligibly_better": 0.5},
            "count_by_level": {"significantly_better": 30, "better": 30, "slightly_better": 20,
                               "negligibly_better": 20}, "unsafe_recall": 0.8})
    ppo = root / "rlhf_v1" / "ppo" / "ppo_metrics.jsonl"
    ppo.parent.mkdir(parents=True)
    ppo.write_text("\n".join(json.dumps({"iteration": i, "reward": 0.1 * i, "kl": 0.01 * i,
                                         "rs": 0.5, "rh": 0.4 + 0.01 * i, "entropy": 2 - 0.05 * i,
                                         "proxy_reward": 0.1 * i, "gold_reward": 0.4 + 0.01 * i,
                                         "rollout_s": 1.0}) for i in range(12)) + "\n")
    write(root / "gatt" / "adherence.json",
          {"before": {"language": [1.0, 0.6, 0.3, 0.1], "persona": [1.0, 0.7, 0.4, 0.2]},
           "after": {"language": [1.0, 1.0, 1.0, 0.95], "persona": [1.0, 1.0, 0.9, 0.9]}})
    write(root / "distill" / "summary.json",
          {"by_kind": {"safety": {"by_initial_score": [
              {"rm_plain": -1.0, "rm_change": 0.9, "prompts": 3, "kept_gated": 3},
              {"rm_plain": 0.5, "rm_change": 0.1, "prompts": 3, "kept_gated": 1},
              {"rm_plain": 2.0, "rm_change": -0.6, "prompts": 3, "kept_gated": 0}]}},
           "eval": {k: {"violation_rate": v, "false_refusal": 0.1, "mean_safety": 0.8,
                        "mean_helpfulness": 0.5}
                    for k, v in (("before", 0.2), ("gated", 0.05), ("ungated", 0.1))}})
    write(root / "safety_scaling.json",
          {"shares": [0.0, 0.25, 0.5, 1.0], "mean_helpfulness": [0.6, 0.61, 0.6, 0.59],
           "safety_scores": [[0.1, 0.5, 0.9], [0.3, 0.6, 0.9], [0.5, 0.8, 1.0], [0.8, 0.9, 1.0]],
           "false_refusal": [0.01, 0.02, 0.03, 0.05]})
    write(root / "reproduction.json", [
        {"finding": "GAtt keeps the instruction for 20 turns", "paper": "100%",
         "measured": "95%", "reproduced": True},
        {"finding": "RM accuracy highest on 'significantly better'", "paper": "Table 8",
         "measured": 0.9, "reproduced": True}])
    return root


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


def test_full_run_renders_every_section(full_run):
    res = build_report(full_run)
    assert res["missing"] == []
    assert res["versions"] == ["sft", "rlhf_v1", "final"]
    titles = res["sections"]
    assert titles[0].startswith("Reproduction")
    for want in ("Helpfulness", "violation rate", "risk category", "false refusal",
                 "tracking", "TruthfulQA", "BOLD", "ToxiGen", "Perplexity", "Reward models",
                 "PPO curves", "Proxy vs gold", "Ghost Attention", "context distillation", "scaling"):
        assert any(want.lower() in t.lower() for t in titles), want
    page = (full_run / "report.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert len(srcs) >= 12
    for src in srcs:  # relative paths that resolve from the run directory, real PNGs
        assert not Path(src).is_absolute()
        assert (full_run / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("<table>") >= len(titles)
    md = (full_run / "report.md").read_text()
    assert "| sft |" in md and "no classifier" in md and "![" in md
    assert "kept by the gate: 3, 1, 0 of 3, 3, 3" in md and "| gated | 5.0% |" in md
    # The gold-answering version beats the refusing baseline; the refusing one ties.
    h = json.loads((full_run / "eval" / "final" / "helpfulness.json").read_text())
    assert h["world"]["win"] == 1.0


def test_inline_report_is_one_file(full_run, tmp_path):
    res = build_report(full_run, out=tmp_path, inline=True)
    page = Path(res["html"]).read_text()
    assert "data:image/png;base64," in page and "report_plots/" not in page


def test_partial_and_broken_runs_still_report(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = build_report(empty)
    assert res["sections"] == [] and len(res["missing"]) >= 8
    assert "Not in this run" in (empty / "report.html").read_text()

    broken = tmp_path / "broken"
    write(broken / "eval" / "sft" / "safety.json", {"violation": {"rate": "oops"}})
    write(broken / "eval" / "sft" / "truthfulqa.json", {"skipped": "no data"})
    (broken / "rm_x").mkdir()
    (broken / "rm_x" / "eval.json").write_text("{not json")
    (broken / "ppo_metrics.jsonl").write_text('{"iteration": 0, "reward": 1.0}\n{"iteration": 1, "rew')
    write(broken / "gatt" / "adherence.json", {"before": {"x": [1.0, 0.5]}})
    res = build_report(broken)
    assert any(t.startswith("PPO") for t in res["sections"])
    assert any(t.startswith("Ghost") for t in res["sections"])
    assert any("could not be rendered" in m for m in res["missing"])
    assert (broken / "report.html").is_file()


def test_cli_entry(full_run, capsys):
    from llama2.cli import main

    main(["report", str(full_run)])
    assert "wrote" in capsys.readouterr().out


def test_version_order():
    names = ["final", "rlhf_v10", "sft", "rlhf_v2", "pretrain", "custom", "gatt"]
    assert sorted(names, key=version_key) == ["pretrain", "sft", "rlhf_v2", "rlhf_v10", "gatt",
                                              "custom", "final"]


def test_tracking_assembled_from_version_evals(tmp_path):
    for name, respond in (("rlhf_v1", gold), ("sft", refuse)):
        run_suites(None, ["tracking"], tmp_path / "eval" / name, respond=respond, n_prompts=4,
                   name=name)
    build_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    table = md[md.index("| version | helpfulness_gold"):]
    assert table.index("| sft |") < table.index("| rlhf_v1 |")


def test_proxy_vs_gold_says_when_the_proxy_rises_and_the_gold_falls(tmp_path):
    """Rejection sampling's best-of-K and PPO's iterations, proxy (RM) and gold (annotator)
    reward in one plot; a note only where the proxy rises while the gold falls."""
    write(tmp_path / "rlhf/v1/rejection_sampling/curves.json",
          {"reward": "rm", "proxy_vs_gold": {"k": [1, 2, 4], "proxy": [0.5, 0.6, 0.7],
                                             "gold": [0.5, 0.45, 0.4]}})
    ppo = tmp_path / "rlhf/v2/ppo/ppo_metrics.jsonl"
    ppo.parent.mkdir(parents=True)
    ppo.write_text("\n".join(json.dumps({"iteration": i, "reward": 0.5 + i / 100,
                                         "proxy_reward": 0.5 + i / 100, "gold_reward": 0.4 + i / 50})
                             for i in range(1, 6)))
    build_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Proxy vs gold reward" in md and (tmp_path / "report_plots/proxy_vs_gold.png").is_file()
    notes = [line for line in md.splitlines() if "over-optimization" in line]
    assert len(notes) == 1 and "rejection_sampling" in notes[0]
