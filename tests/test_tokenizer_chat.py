"""Tokenizer (against sentencepiece itself) and the chat format (against Meta's reference code)."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from conftest import shared_file
from llama2.chat import DialogError, encode_dialog, encode_prompt
from llama2.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def llama_tok() -> Tokenizer:
    return Tokenizer(shared_file("llama2-tokenizer", "tokenizer.model"))


def reference_chat_tokens(tok: Tokenizer, dialog: list[dict]) -> list[int]:
    """Meta's `Llama.chat_completion` prompt building (llama/generation.py), transcribed."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"],
                   "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
                  ] + dialog[2:]
    tokens: list[int] = sum(
        [tok.encode(f"{B_INST} {(p['content']).strip()} {E_INST} {(a['content']).strip()} ",
                    bos=True, eos=True) for p, a in zip(dialog[::2], dialog[1::2])], [])
    tokens += tok.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", bos=True,
                         eos=False)
    return tokens


def test_ids_equal_sentencepiece(llama_tok):
    sp = spm.SentencePieceProcessor(model_file=str(shared_file("llama2-tokenizer",
                                                               "tokenizer.model")))
    assert llama_tok.encode("Hello world") == [1, 15043, 3186]
    for text in ["Hello world", "The year 2023 had 365 days.", "héllo wörld 日本語 🙂",
                 "  leading spaces\nand\ttabs", "[INST] hi [/INST]"]:
        assert llama_tok.encode(text, bos=False) == sp.encode(text)
        assert llama_tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert llama_tok.n_words == 32000 and llama_tok.bos_id == 1 and llama_tok.eos_id == 2


DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Always answer with Haiku"},
     {"role": "user", "content": "I am going to Paris, what should I see?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! How can I help? "},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6"}, {"role": "user", "content": "thanks"}],
]


@pytest.mark.parametrize("dialog", DIALOGS)
def test_chat_format_equals_reference(llama_tok, dialog):
    assert encode_prompt(llama_tok, dialog) == reference_chat_tokens(llama_tok, dialog)


def test_answer_mask_covers_exactly_the_answers(llama_tok):
    dialog = DIALOGS[3][:5]  # system, user, assistant, user, assistant
    ids, mask = encode_dialog(llama_tok, dialog)
    assert len(ids) == len(mask)
    learned = [i for i, m in zip(ids, mask) if m]
    # Each answer's pieces, its trailing space and EOS, nothing of the prompts.
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    assert [llama_tok.decode(s).strip() for s in spans] == ["4", "6"]
    assert all(s[-1] == llama_tok.eos_id for s in spans)
    assert learned.count(llama_tok.bos_id) == 0
    ids_last, mask_last = encode_dialog(llama_tok, dialog, learn="last")
    assert ids_last == ids and sum(mask_last) == len(spans[1])
    assert mask_last[-len(spans[1]):] == [True] * len(spans[1])


@pytest.mark.parametrize("dialog, message", [
    ([], "non-empty"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "assistant", "content": "a"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "alternate"),
    ([{"role": "bot", "content": "a"}], "unknown role 'bot'"),
    ([{"role": "user"}], "expected"),
])
def test_malformed_dialogs_are_clear_errors(llama_tok, dialog, message):
    with pytest.raises(DialogError, match=message):
        encode_dialog(llama_tok, dialog)


def test_prompt_must_end_with_user(llama_tok):
    with pytest.raises(DialogError, match="last message must be from the user"):
        encode_prompt(llama_tok, [{"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b"}])


def test_train_tokenizer_with_llama_settings(tmp_path):
    text = shared_file("tinyshakespeare", "input.txt").read_text()[:200_000]
    tok = train_tokenizer([text, "Numbers 12345 and 2023."], tmp_path / "tok.model",
                          vocab_size=600)
    assert tok.n_words == 600 and (tmp_path / "tok.model").is_file()
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    pieces = [tok.id_to_piece(i) for i in tok.encode("In 2023 we 1234", bos=False)]
    # Digits are split one by one: no piece holds two digits.
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces if not p.startswith("<0x"))
    assert tok.decode(tok.encode("In 2023 we 1234")) == "In 2023 we 1234"
    # Byte fallback: characters never seen decode back exactly.
    assert tok.decode(tok.encode("ünïcödé ✓")) == "ünïcödé ✓"
    reloaded = Tokenizer(tmp_path / "tok.model")
    assert reloaded.encode("To be or not") == tok.encode("To be or not")


def test_empty_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", "\n"], tmp_path / "t.model", vocab_size=300)
    assert not (tmp_path / "t.model").exists()
