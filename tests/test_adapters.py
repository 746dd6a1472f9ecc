"""Real-data adapters: record counts on the public samples, round trips, file:line errors."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from llama2.world import Annotator, World
from llama2.world.adapters import (
    DataError,
    PreferencePair,
    load_alpaca,
    load_hf_dataset,
    load_hh_rlhf,
    load_messages_jsonl,
    load_preferences_jsonl,
    load_pretraining_text,
    load_seed_tasks,
    load_sft,
    load_xstest,
    write_messages_jsonl,
    write_preferences_jsonl,
)

DATA = Path(__file__).parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(),
                                reason=f"public data samples not found at {DATA}")


def _one_line_error(exc: pytest.ExceptionInfo[DataError], path: Path, line: int) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:{line}: "), msg
    return msg


# ------------------------------------------------------------------ public samples

@needs_data
@pytest.mark.parametrize("tranche,count", [("harmless-base", 2312), ("helpful-base", 2354),
                                           ("helpful-online", 1137),
                                           ("helpful-rejection-sampled", 2749)])
def test_hh_rlhf_counts(tranche: str, count: int) -> None:
    pairs = load_hh_rlhf(DATA / "hh-rlhf" / tranche / "test.jsonl.gz")
    assert len(pairs) == count
    for p in pairs:
        assert p.dialog[-1]["role"] == "user" and p.dialog[0]["role"] == "user"
        assert all(m["role"] != p.dialog[i - 1]["role"] for i, m in enumerate(p.dialog) if i)
        assert p.source == f"hh-rlhf:{tranche}"
    if tranche == "harmless-base":
        assert pairs[0].dialog[0]["content"] == "what are some pranks with a pen i can do?"
        assert len(pairs[0].dialog) % 2 == 1


@needs_data
def test_alpaca_dpo_seed_c4_xstest_counts() -> None:
    demo = DATA / "llamafactory-demo"
    alpaca = load_alpaca(demo / "alpaca_en_demo.json")
    assert len(alpaca) == 999
    assert all(d[-1]["role"] == "assistant" and d[-2]["role"] == "user" for d in alpaca)
    assert load_sft(demo / "alpaca_en_demo.json") == alpaca
    assert len(load_preferences_jsonl(demo / "dpo_en_demo.json")) == 300
    assert len(load_seed_tasks(DATA / "stanford-alpaca-seed" / "seed_tasks.jsonl")) == 175
    assert len(list(load_pretraining_text(demo / "c4_demo.jsonl"))) == 300
    stories = list(load_pretraining_text(DATA / "tinystories-sample" / "tiny_stories.txt"))
    assert len(stories) > 1000 and stories[0].startswith("One day, a little girl named Lily")
    xs = load_xstest(DATA / "xstest" / "xstest_prompts.csv")
    assert len(xs) == 450 and sum(p.kind == "borderline" for p in xs) == 250


# ------------------------------------------------------------------ round trips

def test_messages_round_trip_and_counts(tmp_path: Path) -> None:
    dialogs = World(0).demonstrations(30, 10)
    path = tmp_path / "sft.jsonl"
    write_messages_jsonl(path, dialogs)
    assert load_messages_jsonl(path) == dialogs
    assert load_sft(path) == dialogs


def test_preferences_round_trip(tmp_path: Path) -> None:
    w, ann = World(0), Annotator(0)
    pairs = [ann.compare(p, p.answer or "", "I don't know.").to_pair()
             for p in w.helpful_prompts(10)]
    pairs += [ann.compare(p, p.answer or "", p.meta["unsafe_answer"], "safety").to_pair()
              for p in w.safety_prompts(5)]
    path = tmp_path / "prefs.jsonl"
    write_preferences_jsonl(path, pairs)
    assert load_preferences_jsonl(path) == pairs
    assert {p.safety_bin for p in pairs[10:]} <= {"chosen_safe_other_unsafe",
                                                  "chosen_unsafe_other_safe"}
    # the simple {"prompt", "chosen", "rejected"} form is read too
    simple = tmp_path / "simple.jsonl"
    simple.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "No.",
                                  "level": "better"}) + "\n")
    assert load_preferences_jsonl(simple) == [PreferencePair(
        [{"role": "user", "content": "Hi?"}], "Hello.", "No.", level="better",
        source="simple.jsonl")]


def test_hh_rlhf_plain_and_gz(tmp_path: Path) -> None:
    rec = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 4.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 5."}
    plain = tmp_path / "h" / "test.jsonl"
    plain.parent.mkdir()
    plain.write_text(json.dumps(rec) + "\n")
    gz = tmp_path / "h" / "test.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    for path in (plain, gz):
        (p,) = load_hh_rlhf(path)
        assert p.dialog == [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": "2+2?"}]
        assert (p.chosen, p.rejected, p.source) == ("4.", "5.", "hh-rlhf:h")


def test_pretraining_text_forms(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("doc one\nstill one\n\n\ndoc two\n")
    assert list(load_pretraining_text(a)) == ["doc one\nstill one", "doc two"]
    b = tmp_path / "b.txt"
    b.write_text("line one\nline two\n")
    assert list(load_pretraining_text(b)) == ["line one", "line two"]
    c = tmp_path / "c.jsonl"
    c.write_text('{"text": "x y"}\n\n{"text": "z"}\n')
    assert list(load_pretraining_text(c)) == ["x y", "z"]
    docs = list(World(0).corpus(3000))  # the exported corpus.txt form round-trips
    d = tmp_path / "corpus.txt"
    d.write_text("\n\n".join(docs) + "\n")
    assert list(load_pretraining_text(d)) == docs


# ------------------------------------------------------------------ malformed input

def test_messages_bad_line_names_file_and_line(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}]}
    lines = [json.dumps(good), json.dumps(good),
             json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                      {"role": "user", "content": "Again"}]}),
             "{not json", json.dumps(good)]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    with pytest.raises(DataError) as e:
        load_messages_jsonl(path)
    assert "alternate" in _one_line_error(e, path, 3)
    assert path.read_bytes() == before  # the file is only read
    kept = load_messages_jsonl(path, on_error="skip")
    assert len(kept) == 3  # nothing else of the file is lost


def test_alpaca_bad_record_names_line(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    recs = [{"instruction": "Say hi.", "input": "", "output": "Hi."},
            {"instruction": "Add.", "input": "2 and 3", "output": "5."},
            {"instruction": "No output here."}]
    path.write_text(json.dumps(recs, indent=2))
    with pytest.raises(DataError) as e:
        load_alpaca(path)
    assert "output" in _one_line_error(e, path, 12)  # the third element starts on line 12
    kept = load_alpaca(path, on_error="skip")
    assert kept[1][0]["content"] == "Add.\n\n2 and 3" and len(kept) == 2
    broken = tmp_path / "b.json"
    broken.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": oops}\n]')
    with pytest.raises(DataError) as e:
        load_alpaca(broken)
    _one_line_error(e, broken, 3)


def test_hh_and_preferences_bad_lines(tmp_path: Path) -> None:
    gz = tmp_path / "bad.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b",
                            "rejected": "\n\nHuman: a\n\nAssistant: c"}) + "\n")
        f.write(json.dumps({"chosen": "no transcript", "rejected": "x"}) + "\n")
    with pytest.raises(DataError) as e:
        load_hh_rlhf(gz)
    assert "Human" in _one_line_error(e, gz, 2)
    assert len(load_hh_rlhf(gz, on_error="skip")) == 1
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                     + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b",
                                   "level": "much_better"}) + "\n")
    with pytest.raises(DataError) as e:
        load_preferences_jsonl(prefs)
    assert "level" in _one_line_error(e, prefs, 2)
    txt = tmp_path / "t.jsonl"
    txt.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError) as e:
        list(load_pretraining_text(txt))
    _one_line_error(e, txt, 2)


def test_missing_file_and_hf_without_datasets(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_messages_jsonl(tmp_path / "nope.jsonl")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DataError, match="datasets"):
        load_hf_dataset("Anthropic/hh-rlhf")
