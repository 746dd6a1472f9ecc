"""`respond`: the one dialogs-or-texts-to-answers function, checked against `generate` itself."""

from __future__ import annotations

import pytest

from conftest import shared_file
from llama2.chat import encode_prompt
from llama2.generation import generate
from llama2.respond import PromptTooLong, respond

STORY = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def loaded():
    import llama2

    return llama2.load(shared_file("tinyllamas-stories260K", "stories260K.bin"))


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_answers_equal_generate_and_stream_in_order(loaded):
    m, tok = loaded.model, loaded.tokenizer
    dialogs = [STORY, [{"role": "user", "content": "Lily had a ball."}]]
    ids = [encode_prompt(tok, d) for d in dialogs]
    gen = generate(m, ids, max_new_tokens=24, temperature=0.9, top_p=0.9, seed=3,
                   eos_id=tok.eos_id, pad_id=tok.pad_id)
    answers = respond(m, tok, dialogs, 24, temperature=0.9, top_p=0.9, seed=3, logprobs=True)
    assert [a.prompt for a in answers] == ids
    assert [a.tokens for a in answers] == gen.tokens
    assert [a.logprobs for a in answers] == gen.logprobs
    assert [a.text for a in answers] == [tok.decode(until_eos(t, tok.eos_id)).strip()
                                         for t in gen.tokens]
    assert [a.finished for a in answers] == gen.finished
    pieces: dict[int, list[str]] = {0: [], 1: []}
    order: list[int] = []
    streamed = respond(m, tok, dialogs, 24, temperature=0.9, top_p=0.9, seed=3,
                       stream=lambda r, s: pieces[r].append(s) or order.append(r))
    assert streamed == [a.text for a in answers]
    assert ["".join(pieces[r]).strip() for r in (0, 1)] == streamed
    # One call per new token of each row, in row order within a step.
    assert len(pieces[0]) == len(gen.tokens[0]) and len(pieces[1]) == len(gen.tokens[1])


def test_stop_strings_budgets_and_cancel(loaded):
    m, tok = loaded.model, loaded.tokenizer
    full = respond(m, tok, [STORY], 40, full=True)[0]
    word = full.text.split()[3]
    cut = respond(m, tok, [STORY, STORY], [40, 5], stop=[[word], []], full=True)
    assert cut[0].text == full.text[: full.text.index(word)].strip()
    assert cut[0].reason == "stop" and len(cut[0].tokens) < len(full.tokens)
    assert cut[1].tokens == full.tokens[:5] and cut[1].reason == "length"
    gone = respond(m, tok, [STORY], 40, stream=lambda r, s: True, full=True)[0]
    assert gone.reason == "cancelled" and len(gone.tokens) == 1


def test_text_format_and_fitting(loaded):
    m, tok = loaded.model, loaded.tokenizer
    ctx = m.args.max_seq_len
    prompt = tok.encode("Once upon a time", bos=True)
    gen = generate(m, [prompt], max_new_tokens=16, eos_id=tok.eos_id, pad_id=tok.pad_id)
    (text,) = respond(m, tok, ["Once upon a time"], 16, format="text")
    # A continuation keeps its leading space: prompt + continuation read as one text.
    assert "Once upon a time" + text == tok.decode(prompt + until_eos(gen.tokens[0], tok.eos_id))
    long = [{"role": "user", "content": "word " * 600}]
    cut = respond(m, tok, [long], 400, full=True)[0]  # budget at most half the context
    assert len(cut.prompt) == ctx - ctx // 2 and cut.prompt[0] == tok.bos_id
    skipped = respond(m, tok, [long, STORY], 16, fit="skip", full=True)
    assert skipped[0].reason == "skipped" and skipped[0].text == "" and skipped[1].tokens
    with pytest.raises(PromptTooLong):
        respond(m, tok, [long], 16, fit="shrink")
    shrunk = respond(m, tok, [STORY], 10_000, fit="shrink", full=True)[0]
    assert len(shrunk.tokens) <= ctx - len(shrunk.prompt)
    assert respond(m, tok, [], 16) == []
