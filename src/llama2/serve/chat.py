"""`llama2 chat`: talk to a model in the terminal, in the Llama 2 chat format, streaming tokens.

Commands inside the chat: /reset (forget the dialog), /system TEXT (set the system message
and reset), /save FILE (write the dialog as JSON), /quit. A message or system message that
carries a chat tag ([INST], [/INST], <<SYS>>, <</SYS>>) is refused in one line and the session
goes on; the model's answer ends where it starts writing a tag.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TextIO

from llama2.chat import (
    DEFAULT_SYSTEM_PROMPT,
    SPECIAL_TAGS,
    Dialog,
    SpecialTagError,
    find_special_tag,
)
from llama2.commands import DTYPES, add_sampling_args, load_for_inference
from llama2.generation import Decoder
from llama2.respond import PromptTooLong, respond
from llama2.utils import atomic_write_text


class ChatSession:
    """A dialog with a model; `reply(text)` streams the answer through `write`."""

    def __init__(self, loaded, system: str | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256, seed: int = 0):
        self.model, self.tok = loaded.model, loaded.tokenizer
        self.decoder = Decoder(self.model)  # one per session: a compiled step is made once
        self.system = system
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        self.max_new_tokens = max_new_tokens
        self.dialog: Dialog = []

    def reset(self) -> None:
        self.dialog = []

    def messages(self) -> Dialog:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.dialog

    def reply(self, text: str, write: Callable[[str], None] = lambda s: None) -> str:
        dialog = self.messages() + [{"role": "user", "content": text}]

        def show(row: int, delta: str) -> None:
            if delta:
                write(delta)

        try:
            # A chat tag starts a new turn: the answer ends there, so the next prompt holds none.
            answer = respond(self.model, self.tok, [dialog], self.max_new_tokens, fit="shrink",
                             stop=SPECIAL_TAGS, stream=show,
                             decoder=self.decoder, **self.sampling)[0]
        except PromptTooLong as e:
            raise ValueError(f"the dialog is {e.tokens} tokens, longer than the context of "
                             f"{e.context}; /reset to start over") from None
        self.dialog += [{"role": "user", "content": text},
                        {"role": "assistant", "content": answer}]
        return answer

    def save(self, path: str) -> None:
        atomic_write_text(path, json.dumps(self.messages(), indent=2, ensure_ascii=False) + "\n")


_TAG_REFUSAL = ("the text contains the chat tag {tag!r}, which marks turns in the Llama 2 chat "
                "format and is not allowed inside a message")


def run(session: ChatSession, stdin: TextIO, stdout: TextIO) -> None:
    interactive = stdin.isatty()

    def write(s: str) -> None:
        stdout.write(s)
        stdout.flush()

    while True:
        if interactive:
            write("\n> ")
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            write("[dialog reset]\n")
        elif line.startswith("/system"):
            tag = find_special_tag(line)
            if tag is not None:
                write(f"[refused: {_TAG_REFUSAL.format(tag=tag)}; the system message is "
                      "unchanged]\n")
                continue
            session.system = line[len("/system"):].strip() or None
            session.reset()
            write(f"[system message {'set' if session.system else 'cleared'}; dialog reset]\n")
        elif line.startswith("/save"):
            path = line[len("/save"):].strip()
            if not path:
                write("[usage: /save FILE]\n")
                continue
            session.save(path)
            write(f"[dialog saved to {path}]\n")
        elif line.startswith("/"):
            write("[commands: /reset, /system TEXT, /save FILE, /quit]\n")
        else:
            try:
                session.reply(line, write)
            except SpecialTagError as e:  # one line; the dialog so far is kept as it was
                write(f"[refused: {_TAG_REFUSAL.format(tag=e.tag)}; nothing was sent]")
            except ValueError as e:
                write(f"[error: {e}]")
            write("\n")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="llama2 chat", description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--system", default=None, help="system message ('default' = Meta's)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--device", default="auto")
    add_sampling_args(ap)
    a = ap.parse_args(argv)
    if a.system and find_special_tag(a.system):  # refused before the model is loaded
        raise ValueError(f"--system: {_TAG_REFUSAL.format(tag=find_special_tag(a.system))}")
    loaded = load_for_inference(a.model, a.tokenizer, a.dtype, a.device)
    system = DEFAULT_SYSTEM_PROMPT if a.system == "default" else a.system
    session = ChatSession(loaded, system, a.temperature, a.top_p, a.top_k, a.max_new_tokens,
                          a.seed)
    if sys.stdin.isatty():
        print("chat with the model; /reset, /system TEXT, /save FILE, /quit")
    run(session, sys.stdin, sys.stdout)
