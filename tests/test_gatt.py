"""Ghost Attention (paper §3.3): the training-dialog shape and loss mask, sampling with the
checker and fallback, context fitting, the manual attention weights, and the stage end to end
on a tiny untrained model (mechanics only; the adherence effect needs a trained policy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama2 import checkpoint
from llama2.chat import B_INST, E_INST, encode_prompt
from llama2.data.sft import collate_rows, encode_examples, pack
from llama2.engine import IGNORE_INDEX, TrainConfig
from llama2.eval import attention_probe, multiturn
from llama2.model import ModelArgs, Transformer
from llama2.stages import gatt
from llama2.stages.common import load_policy
from llama2.tokenizer import train_tokenizer
from llama2.world import World, instruction_by_name
from llama2.world.instructions import NEUTRAL_SYSTEM, load_instructions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer trained on world text and an untrained tiny model saved as a checkpoint."""
    folder = tmp_path_factory.mktemp("gatt")
    w = World(0)
    texts = [m["content"] for d in w.demonstrations(150, 50) for m in d]
    texts += [f"{i.verbose} {i.terse}" for i in w.instructions()] + ["[INST] [/INST] <<SYS>>"]
    tok = train_tokenizer(texts, folder / "tok.model", vocab_size=400)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                  vocab_size=tok.n_words, multiple_of=16, max_seq_len=256))
    model.init_weights()
    checkpoint.save(model, tok, folder / "policy")
    return tok, folder / "policy"


def test_gatt_training_dialog_learns_only_the_last_turn(tiny):
    tok, _ = tiny
    inst = instruction_by_name("figure_wizard")
    users = ["What is 4 plus 1?", "Add 6 and 3.", "What is Orla's job?"]
    answers = [inst.apply(a) for a in ("4 plus 1 is 5.", "6 plus 3 is 9.", "Orla is a doctor.")]
    # Sampling: the instruction is concatenated to every user turn.
    sampled = gatt.sampling_dialog(inst.verbose, users, answers[:2])
    assert [m["role"] for m in sampled] == ["user", "assistant"] * 2 + ["user"]
    assert all(m["content"].endswith(inst.verbose) for m in sampled if m["role"] == "user")
    # Training: the instruction only in the system message.
    dialog = gatt.training_dialog(inst.verbose, users, answers)
    assert dialog[0] == {"role": "system", "content": inst.verbose}
    assert all(inst.verbose not in m["content"] for m in dialog[1:])
    ids, mask = gatt.gatt_example(tok, dialog)
    assert tok.decode(ids).count(inst.verbose) == 1
    # Token by token: every token of the earlier turns (assistant answers included) is masked,
    # and in the last turn exactly the answer (with its EOS) is learned.
    first = f"<<SYS>>\n{inst.verbose}\n<</SYS>>\n\n{users[0]}"
    turns = [(first, answers[0]), (users[1], answers[1]), (users[2], answers[2])]
    at = 0
    for t, (u, a) in enumerate(turns):
        full = tok.encode(f"{B_INST} {u} {E_INST} {a} ", bos=True, eos=True)
        head = tok.encode(f"{B_INST} {u} {E_INST}", bos=True)
        assert ids[at:at + len(full)] == full
        seg = mask[at:at + len(full)]
        if t < len(turns) - 1:
            assert not any(seg), f"turn {t} has learned tokens"
        else:
            assert seg == [False] * len(head) + [True] * (len(full) - len(head))
            assert tok.decode([i for i, m in zip(full, seg) if m]).strip() == a
        at += len(full)
    assert at == len(ids)
    # Through the SFT data pipeline: targets only inside the last answer.
    examples, _ = encode_examples(tok, [dialog], 256, learn="last")
    batch = collate_rows(pack(examples, 256), 256, tok.pad_id)
    learned = (batch["targets"][0] != IGNORE_INDEX).nonzero().view(-1).tolist()
    last_answer = [i for i, m in enumerate(mask) if m]
    assert [i + 1 for i in learned] == last_answer[1:] or [i + 1 for i in learned] == last_answer


@pytest.fixture
def policy_and_pool(tiny):
    """The tiny policy loaded and the world's instruction pool."""
    return load_policy(str(tiny[1]), "cpu"), load_instructions("world")


def test_sampling_keeps_checked_samples_and_falls_back(policy_and_pool):
    loaded, pool = policy_and_pool
    cfg = gatt.GAttConfig(n_dialogs=6, min_turns=1, max_turns=3, k=2, max_new_tokens=8,
                          seq_len=256, combo_share=0.5)
    plans = gatt.plan_dialogs(cfg, pool)
    assert len(plans) == 6 and all(1 <= len(p.tasks) <= 3 for p in plans)
    records, stats = gatt.sample_gatt_dialogs(loaded, plans, cfg)
    assert stats["accepted"] + stats["fallback"] + stats["dropped"] == stats["turns"] > 0
    insts = {i.name: i for i in pool}
    for r in records:  # fallback "apply": every kept answer obeys the instruction
        inst = insts.get(r["instruction"]) or next(p.instruction for p in plans
                                                   if p.instruction.name == r["instruction"])
        assert all(inst.check(a) for a in r["answers"])
    cfg.fallback_base = "gold"  # the world's gold answer made obeying
    records, _ = gatt.sample_gatt_dialogs(loaded, plans, cfg)
    tasks = {t.user: t.answer for p in plans for t in p.tasks}
    for r in records:
        for u, a, ok in zip(r["users"], r["answers"], r["accepted"]):
            inst = next(p.instruction for p in plans if p.instruction.name == r["instruction"])
            assert ok or a == inst.apply(tasks[u])
    cfg.fallback_base = "bogus"
    with pytest.raises(ValueError, match="fallback_base"):
        gatt.sample_gatt_dialogs(loaded, plans, cfg)
    cfg.fallback_base, cfg.fallback = "plain", "drop"
    records, stats = gatt.sample_gatt_dialogs(loaded, plans, cfg)
    assert stats["fallback"] == 0
    assert all(all(r["accepted"]) for r in records)


def test_neutral_system_messages_keep_the_policy_answers(policy_and_pool, monkeypatch):
    loaded, pool = policy_and_pool
    cfg = gatt.GAttConfig(n_dialogs=40, min_turns=1, max_turns=2, k=1, max_new_tokens=8,
                          seq_len=256, neutral_share=0.5)
    plans = gatt.plan_dialogs(cfg, pool)
    neutral = [p for p in plans if p.instruction.family == "neutral"]
    assert 8 <= len(neutral) <= 32  # about half
    assert {p.instruction for p in neutral} <= set(NEUTRAL_SYSTEM)
    records, _ = gatt.sample_gatt_dialogs(loaded, neutral, cfg)
    for r in records:  # any finished answer is kept as it is (nothing to apply)
        assert all(a.strip() for a in r["answers"]) and r["inst"] in {
            x for n in NEUTRAL_SYSTEM for x in (n.verbose, n.terse)}
    assert gatt.plan_dialogs(gatt.GAttConfig(n_dialogs=40, neutral_share=0.0), pool)[0] \
        .instruction.family != "neutral"
    # The marker rate: answers under a neutral system message that obey some instruction.
    monkeypatch.setattr(multiturn, "respond", lambda model, tok, d, *a, **k: [
        "Arr matey! It is 7." if i % 4 == 0 else "It is 7." for i in range(len(d))])
    assert multiturn.marker_rate(loaded, pool, n_tasks=10) == pytest.approx(0.25)


def test_fit_context_keeps_the_system_message(tiny):
    tok, _ = tiny
    d = [{"role": "system", "content": "Figure: wizard"}]
    for i in range(20):
        d += [{"role": "user", "content": f"What is {i} plus 1?"},
              {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}]
    d.append({"role": "user", "content": "Add 6 and 3."})
    fitted = multiturn.fit_context(tok, d, 120)
    assert fitted[0] == d[0] and fitted[-1] == d[-1] and len(fitted) < len(d)
    assert len(encode_prompt(tok, fitted)) <= 120
    assert len(encode_prompt(tok, fitted[:1] + fitted[3:])) <= len(encode_prompt(tok, fitted))


def test_attention_weights_reproduce_the_model(tiny):
    tok, path = tiny
    loaded = load_policy(str(path), "cpu")
    model = loaded.model
    inst = instruction_by_name("hobby_chess")
    dialog = attention_probe.figure10_dialog(inst, tok, 200)
    ids = tok.encode("[INST] hello there [/INST] Hi.", bos=True)
    weights = attention_probe.attention_weights(model, ids)
    assert len(weights) == model.args.n_layers
    w0 = weights[0]
    assert torch.allclose(w0.sum(-1), torch.ones_like(w0.sum(-1)), atol=1e-5)
    # Recompute layer 0's attention output from the weights: equals the SDPA path.
    x = torch.tensor([ids])
    T = x.shape[1]
    layer = model.layers[0]
    h = layer.attention_norm(model.tok_embeddings(x))
    cos, sin = model.rope_cos[:T].unsqueeze(0), model.rope_sin[:T].unsqueeze(0)
    with torch.no_grad():
        ref = layer.attention(h, cos, sin)
        att = layer.attention
        v = att.wv(h).view(1, T, att.n_kv_heads, att.head_dim).transpose(1, 2)
        v = v.repeat_interleave(att.n_heads // att.n_kv_heads, dim=1)
        mine = att.wo((w0.unsqueeze(0) @ v).transpose(1, 2).reshape(1, T, -1))
    assert torch.allclose(ref, mine, atol=1e-5)
    res = attention_probe.attention_to_system(loaded, dialog)
    s, e = res["system_tokens"]
    assert 0 < s < e < res["n_tokens"]
    assert inst.verbose.split()[0] in "".join(res["tokens"][s:e]).replace("▁", " ")
    assert len(res["per_layer"]) == model.args.n_layers
    assert all(0.0 <= m <= 1.0 for m in res["per_layer"])


def test_instruction_file(tmp_path):
    f = tmp_path / "inst.json"
    f.write_text(json.dumps([
        {"verbose": "Always answer as a pirate.", "terse": "Style: pirate", "family": "style",
         "check": r"\b(arr|matey)\b", "prefix": "Arr!"},
        {"verbose": "Be nice."},
        instruction_by_name("format_caps").to_dict()]))
    pirate, nice, caps = load_instructions(str(f))
    assert pirate.check("ARR, the sea.") and not pirate.check("The sea.")
    assert pirate.check(pirate.apply("The sea."))
    assert nice.check("anything") and nice.terse == "Be nice." and nice.family == "custom"
    assert caps.check("HELLO") and not caps.check("Hello")
    f.write_text(json.dumps([{"verbose": "x", "check": "("}]))
    with pytest.raises(ValueError, match="regex"):
        load_instructions(str(f))


def test_gatt_stage_end_to_end(tiny, tmp_path):
    _, path = tiny
    insts = [instruction_by_name("figure_robot"), instruction_by_name("format_caps")]
    (tmp_path / "inst.json").write_text(json.dumps([i.to_dict() for i in insts]))
    cfg = gatt.GAttConfig(model=str(path), out=str(tmp_path / "gatt"),
                          instructions=str(tmp_path / "inst.json"), n_dialogs=6, max_turns=3,
                          k=1, max_new_tokens=8, seq_len=256, eval_turns=3, eval_dialogs=2,
                          eval_max_new_tokens=8,
                          train=TrainConfig(lr=1e-3, max_steps=2, warmup_steps=0,
                                            micro_batch_size=4, progress=False, device="cpu"))
    summary = gatt.run(cfg)
    out = tmp_path / "gatt"
    assert all(0 <= summary["eval"]["neutral_marker_rate"][k] <= 1 for k in ("before", "after"))
    assert (out / "model" / "config.json").is_file() and (out / "samples.jsonl").is_file()
    data = json.loads((out / "adherence.json").read_text())
    for key in ("before", "after"):
        assert set(data[key]) == {"figure", "format"}
        assert all(len(v) == 3 and all(0 <= x <= 1 for x in v) for v in data[key].values())
    att = json.loads((out / "attention.json").read_text())
    assert len(att["after"]["per_layer"]) == 2
    assert (out / "adherence.png").is_file() and (out / "attention.png").is_file()
    assert summary["dialogs"] > 0


def test_gatt_reproduction_row_reports_the_neutral_marker_rate(tmp_path):
    from llama2.stages.reproduction import reproduction_table

    def row(after: float, markers: dict | None) -> dict:
        data = {"before": {"figure": [0.0, 0.1]}, "after": {"figure": [1.0, after]},
                "n_dialogs": 40}
        if markers is not None:
            data["neutral_marker_rate"] = markers
        (tmp_path / "gatt").mkdir(exist_ok=True)
        (tmp_path / "gatt" / "adherence.json").write_text(json.dumps(data))
        return next(r for r in reproduction_table(tmp_path) if r["finding"].startswith("GAtt"))

    r = row(0.95, {"before": 0.0, "after": 0.05})
    assert r["reproduced"] and "neutral system message 0.0%->5.0%" in r["measured"]
    assert not row(0.5, None)["reproduced"] and "neutral" not in row(0.5, None)["measured"]


def test_replayed_demonstrations_follow_the_safety_share():
    from llama2.stages.common import Replay
    from llama2.world import Annotator

    def refusals(dialogs) -> int:
        return sum(Annotator.is_refusal(d[-1]["content"]) for d in dialogs)

    few, many = Replay(100, 0.02).dialogs(0), Replay(100, 0.2).dialogs(0)
    assert len(few) == 102 and len(many) == 120
    assert refusals(few) < refusals(many)
    assert Replay(0).dialogs(0) == []
    # Borderline prompts come answered helpfully, from the training split only.
    world = World(0)
    borderline = {p.text for p in world.borderline_prompts(400, split="train")}
    held_out = {p.text for p in world.borderline_prompts(100, split="eval")}
    with_b = Replay(100, 0.02, borderline_share=0.3).dialogs(0)
    added = [d for d in with_b if d[-2]["content"] in borderline]
    assert len(with_b) == 132 and len(added) >= 30
    assert refusals(added) == 0 and not {d[-2]["content"] for d in with_b} & held_out


def test_replay_takes_the_rlhf_picks_on_helpful_prompts(tmp_path: Path):
    """With the RLHF rounds' best.jsonl files the replay's helpful dialogs are the policy's own
    picks (cycled up to `demos`), not the SFT demonstrations; safety ones still come from the
    world, and picks on other prompt kinds are left out."""
    from llama2.stages.common import Replay
    from llama2.utils import write_jsonl

    pick = [{"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "2 plus 3 is 5, because I counted it out."}]
    unsafe = [{"role": "user", "content": "How do I steal a bike?"},
              {"role": "assistant", "content": "I can't help with that."}]
    write_jsonl(tmp_path / "best.jsonl", [{"messages": pick, "kind": "helpful"},
                                          {"messages": unsafe, "kind": "safety"}])
    got = Replay(10, 0.2, picks=[str(tmp_path / "best.jsonl")]).dialogs(0)
    assert sum(d == pick for d in got) == 10 and unsafe not in got
    assert len(got) == 12 and all(d[-1]["content"] for d in got)
    plain = Replay(10, 0.2).dialogs(0)
    assert pick not in plain and len(plain) == 12


def test_instruction_weights_shift_the_dialog_mix():
    pool = load_instructions("world")

    def share(weights: dict[str, float]) -> float:
        cfg = gatt.GAttConfig(n_dialogs=700, combo_share=0.0, instruction_weights=weights)
        return sum(p.instruction.name == "format_caps" for p in gatt.plan_dialogs(cfg, pool)) / 700

    base = share({})
    assert 0.03 < base < 0.12  # one of 14
    assert share({"format_caps": 4.0}) > 2.5 * base
    assert share({"format_caps": 0.0}) == 0.0
    with pytest.raises(ValueError, match="unknown instructions \\['format_cap'\\]"):
        share({"format_cap": 2.0})
    with pytest.raises(ValueError, match="expected numbers"):
        share({"format_caps": "many"})
