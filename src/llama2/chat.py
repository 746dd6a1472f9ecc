"""Dialogs and the Llama 2 chat format, exactly as Meta's reference `chat_completion` (recipe §2).

A dialog is a list of `{"role": "system"|"user"|"assistant", "content": str}`. A system message
may come first; it is folded into the first user message between `<<SYS>>` markers. Every
finished (user, assistant) pair is `BOS [INST] user [/INST] answer EOS`, tokenized as one
string; an open last user turn is `BOS [INST] user [/INST]`.

The turns are marked with plain text, so text that carries a tag could end a turn, write the
assistant's words and open a new one inside one message. As Meta's reference (which answers
"Error: special tags are not allowed as part of the prompt"), a message of any role that holds
one of `SPECIAL_TAGS` is refused: `normalize`, which every encoder goes through, raises
`SpecialTagError`. Only the exact tags are refused: the tokenizer does not normalize text
(identity rule, as Llama's), so only these exact characters encode to a tag's ids; variants
such as "[inst]", "[ INST ]" or full-width brackets encode to other ids and stay plain text.
"""

from __future__ import annotations

from typing import Literal

from llama2.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")  # Meta's list, refused in any message

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as "
    "possible, while being safe. Your answers should not include any harmful, unethical, "
    "racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses "
    "are socially unbiased and positive in nature.\n\nIf a question does not make any sense, "
    "or is not factually coherent, explain why instead of answering something not correct. If "
    "you don't know the answer to a question, please don't share false information."
)

Message = dict[str, str]
Dialog = list[Message]
# What a data loader does with a record whose text carries a chat tag: "error" (one line naming
# file, line and field) or "skip" (counted, one summary line at the end); never trained on.
OnSpecialTags = Literal["error", "skip"]


class DialogError(ValueError):
    """A dialog that does not follow the system? (user assistant)* user? shape."""


class SpecialTagError(DialogError):
    """A message carries a chat-format tag: it could forge turns, so the dialog is refused."""

    def __init__(self, index: int, role: str, tag: str):
        self.index, self.role, self.tag = index, role, tag
        super().__init__(f"message {index} ({role}) contains the chat tag {tag!r}; the tags "
                         f"{', '.join(SPECIAL_TAGS)} mark turns and are not allowed inside a "
                         "message")


def find_special_tag(text: str) -> str | None:
    """The first chat tag in `text` (by position), or None."""
    hits = [(text.find(t), t) for t in SPECIAL_TAGS if t in text]
    return min(hits)[1] if hits else None


def check_special_tags(dialog: Dialog) -> None:
    """Raise SpecialTagError for the first message (of any role) that carries a chat tag."""
    for i, m in enumerate(dialog):
        tag = find_special_tag(m["content"])
        if tag is not None:
            raise SpecialTagError(i, m["role"], tag)


def end_at_special_tag(text: str) -> str:
    """A model's reply up to the first chat tag: writing one is starting a new turn, so the
    reply ends there (as a stop sequence would) and never feeds a forged turn to a later
    prompt, a reward model or a training set."""
    tag = find_special_tag(text)
    return text if tag is None else text[:text.find(tag)].rstrip()


def normalize(dialog: Dialog) -> Dialog:
    """Check roles and chat tags (`SpecialTagError`), and fold a leading system message into
    the first user turn."""
    if not isinstance(dialog, list) or not dialog:
        raise DialogError("a dialog must be a non-empty list of messages")
    for i, m in enumerate(dialog):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise DialogError(f"message {i}: expected {{'role': ..., 'content': str}}, got {m!r}")
        if m["role"] not in ("system", "user", "assistant"):
            raise DialogError(f"message {i}: unknown role {m['role']!r} "
                              "(expected system, user or assistant)")
    check_special_tags(dialog)
    if dialog[0]["role"] == "system":
        if len(dialog) < 2:
            raise DialogError("a system message must be followed by a user message")
        first = dialog[1]
        if first["role"] != "user":
            raise DialogError(f"message 1: expected role 'user' after the system message, "
                              f"got {first['role']!r}")
        dialog = [{"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS
                   + first["content"]}] + dialog[2:]
    for i, m in enumerate(dialog):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise DialogError(f"roles must alternate user/assistant (system only first): turn {i} "
                              f"is {m['role']!r}, expected {want!r}")
    return dialog


def encode_dialog(tok: Tokenizer, dialog: Dialog,
                  learn: Literal["all", "last", "none"] = "all") -> tuple[list[int], list[bool]]:
    """Token ids of a dialog and the mask of assistant-answer tokens to learn.

    learn="all": every assistant answer (SFT); "last": only the final assistant answer (Ghost
    Attention, §3.3); "none": nothing. The answer span is the answer text, its trailing space
    and the EOS, so the model learns to stop. An open final user turn is encoded as the prompt
    that generation continues from.
    """
    dialog = normalize(dialog)
    ids: list[int] = []
    mask: list[bool] = []
    n_pairs = len(dialog) // 2
    for t in range(n_pairs):
        user, answer = dialog[2 * t]["content"], dialog[2 * t + 1]["content"]
        prompt = f"{B_INST} {user.strip()} {E_INST}"
        full = tok.encode(f"{prompt} {answer.strip()} ", bos=True, eos=True)
        head = tok.encode(prompt, bos=True, eos=False)
        cut = len(head)
        if full[:cut] != head:  # the answer merged into the prompt's last piece: find the split
            cut = next((i for i, (a, b) in enumerate(zip(full, head)) if a != b), len(head))
        learn_turn = learn == "all" or (learn == "last" and t == n_pairs - 1)
        ids += full
        mask += [False] * cut + [learn_turn] * (len(full) - cut)
    if len(dialog) % 2 == 1:
        open_turn = tok.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True)
        ids += open_turn
        mask += [False] * len(open_turn)
    return ids, mask


def encode_prompt(tok: Tokenizer, dialog: Dialog) -> list[int]:
    """The prompt ids for generating the next assistant turn; the dialog must end with a user."""
    norm = normalize(dialog)
    if norm[-1]["role"] != "user":
        raise DialogError("the last message must be from the user to generate a reply")
    return encode_dialog(tok, dialog, learn="none")[0]


def with_system(dialog: Dialog, system: str | None) -> Dialog:
    """Put `system` first (replacing an existing system message); None leaves it as is."""
    if system is None:
        return dialog
    rest = dialog[1:] if dialog and dialog[0]["role"] == "system" else dialog
    return [{"role": "system", "content": system}] + list(rest)


def encode_transcript(tok: Tokenizer, dialog: Dialog) -> list[int]:
    """A pretrained model's prompt for the dialog: the plain "User: ...\\nAssistant:" transcript
    its corpus uses (a base model knows no [INST] format; the paper prompts pretrained models
    few-shot). The reply ends at the first newline."""
    dialog = normalize(dialog)
    lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content'].strip()}"
             for m in dialog]
    return tok.encode("\n".join(lines) + "\nAssistant:", bos=True)
