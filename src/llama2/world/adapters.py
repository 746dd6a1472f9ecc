"""Adapters from real data files to the world's internal records.

Every loader returns the same records the world produces: dialogs (lists of
{"role", "content"}), `PreferencePair`s, or plain-text documents. A malformed record raises
`DataError("FILE:LINE: what was expected")`, one line, and the file is only read, never
changed. With `on_error="skip"` a loader instead warns once per bad record (same message) and
keeps every other record of the file.

A record whose dialog text carries a chat tag ([INST], [/INST], <<SYS>>, <</SYS>>, see
`chat.SPECIAL_TAGS`) could forge turns once encoded, so it is never loaded as it is:
`on_special_tags="error"` (default) makes it a malformed record, "FILE:LINE: field
'messages[1].content' carries the chat tag '[/INST]' ..." (raised, or warned and skipped under
`on_error="skip"`); `on_special_tags="skip"` counts and skips such records and prints one
summary line per file at the end. Pretraining text is not a dialog and is kept as it is.

Formats: `messages` JSONL (OpenAI / HF chat form), Alpaca JSON or JSONL (instruction, input,
output, optional system and history), Self-Instruct seed tasks, Anthropic HH-RLHF JSONL (gzipped
or not), preference JSONL (the world's own form, `{"prompt","chosen","rejected"}` strings, or
ShareGPT `conversations` + chosen/rejected as in LLaMA-Factory's dpo demo), plain text or JSONL
for pretraining, XSTest CSV, and Hugging Face dataset names (needs `datasets` and a network).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from llama2.chat import SPECIAL_TAGS, OnSpecialTags, find_special_tag
from llama2.utils import write_jsonl
from llama2.world.annotator import RATING_LEVELS
from llama2.world.records import SAFETY_BINS, Dialog, PreferencePair, Prompt

OnError = Literal["raise", "skip"]
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "bot": "assistant", "model": "assistant"}


class DataError(ValueError):
    """A malformed record: the message is "FILE:LINE: what was expected"."""


class SpecialTagDataError(DataError):
    """A record whose dialog text carries a chat tag: "FILE:LINE: field ... carries ..."."""


# ---------------------------------------------------------------------- reading helpers

def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return open(path, encoding="utf-8")


def _handle(err: DataError, on_error: OnError) -> None:
    if on_error == "raise":
        raise err
    print(f"warning: skipped {err}", file=sys.stderr)


def _records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for a JSONL file or each element of a JSON array file.

    JSON arrays are decoded element by element so that errors still name a line.
    """
    p = Path(path)
    with _open_text(p) as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array (Alpaca, LLaMA-Factory)
        dec = json.JSONDecoder()
        pos = len(text) - len(stripped) + 1
        while True:
            m = re.compile(r"\s*,?\s*").match(text, pos)
            pos = m.end() if m else pos
            if pos >= len(text) or text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                obj, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{e.lineno}: invalid JSON in array element ({e.msg})"
                                ) from None
            yield line, obj
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, DataError(f"{p}:{lineno}: expected one JSON object per line "
                                    f"({e.msg})")


def _texts(item: Any) -> Iterator[str]:
    """The dialog text of a parsed record: message contents, chosen and rejected answers."""
    if isinstance(item, PreferencePair):
        yield from _texts(item.dialog)
        yield from (item.chosen, item.rejected)
    elif isinstance(item, dict):
        yield item["content"]
    elif isinstance(item, list):
        for x in item:
            yield from _texts(x)


def _field_with(obj: Any, tag: str, path: str = "") -> str | None:
    """Where `tag` sits in a raw record, e.g. "messages[2].content" (the first string holding
    it, in the record's order)."""
    if isinstance(obj, str):
        return (path or "record") if tag in obj else None
    if isinstance(obj, dict):
        items = [(f"{path}.{k}" if path else str(k), v) for k, v in obj.items()]
    elif isinstance(obj, list):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    else:
        return None
    return next((hit for p, v in items if (hit := _field_with(v, tag, p)) is not None), None)


def special_tag_error(item: Any, raw: Any, where: str) -> SpecialTagDataError | None:
    """The one-line error for a parsed record (dialogs, a PreferencePair) whose text carries a
    chat tag, naming the field of the raw record; None for a clean record."""
    for text in _texts(item):
        tag = find_special_tag(text)
        if tag is not None:
            return SpecialTagDataError(
                f"{where}: field {_field_with(raw, tag) or 'record'!r} carries the chat tag "
                f"{tag!r}, which would forge a turn of the chat format (on_special_tags = "
                "\"skip\" skips such records)")
    return None


class SpecialTagFilter:
    """Applies `on_special_tags` to one file's records and reports the skipped at the end."""

    def __init__(self, source: str | os.PathLike, on_special_tags: OnSpecialTags):
        if on_special_tags not in ("error", "skip"):
            raise ValueError(f"on_special_tags must be 'error' or 'skip', got "
                             f"{on_special_tags!r}")
        self.source, self.mode, self.skipped = source, on_special_tags, 0

    def keep(self, item: Any, raw: Any, where: str) -> bool:
        """True for a clean record; raises for a tagged one, or counts it under "skip"."""
        err = special_tag_error(item, raw, where)
        if err is None:
            return True
        if self.mode == "error":
            raise err
        self.skipped += 1
        return False

    def summary(self) -> None:
        if self.skipped:
            print(f"warning: {self.source}: skipped {self.skipped} record"
                  f"{'s' if self.skipped != 1 else ''} carrying chat tags "
                  f"({', '.join(SPECIAL_TAGS)}; on_special_tags = \"skip\")", file=sys.stderr)


def _load(path: str | os.PathLike, parse: Callable[[Any, str], Any],
          on_error: OnError, on_special_tags: OnSpecialTags = "error") -> list[Any]:
    out = []
    tags = SpecialTagFilter(path, on_special_tags)
    for lineno, obj in _records(path):
        where = f"{path}:{lineno}"
        try:
            if isinstance(obj, DataError):
                raise obj
            item = parse(obj, where)
            if tags.keep(item, obj, where):
                out.append(item)
        except DataError as e:
            _handle(e, on_error)
    tags.summary()
    return out


def _str(d: dict, key: str, where: str, what: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise DataError(f"{where}: expected {what} with a string {key!r}, got "
                        f"{type(v).__name__}")
    return v


def _dialog(msgs: Any, where: str, end: str | None = None) -> Dialog:
    """Validate a message list: known roles, string contents, user/assistant alternation."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: expected a non-empty list of messages")
    out: Dialog = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i}: expected an object with 'role' and "
                            "'content'")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = _SHAREGPT_ROLES.get(str(role).lower(), role) if "from" in m else role
        if role not in ROLES or not isinstance(content, str):
            raise DataError(f"{where}: message {i}: expected role in {ROLES} and string content,"
                            f" got role {role!r}")
        out.append({"role": role, "content": content})
    body = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise DataError(f"{where}: roles must alternate user/assistant after an optional "
                            f"system message; message {i + len(out) - len(body)} is "
                            f"{m['role']!r}")
    if not body:
        raise DataError(f"{where}: expected at least one user message")
    if end and out[-1]["role"] != end:
        raise DataError(f"{where}: expected the dialog to end with a {end} message")
    return out


# ---------------------------------------------------------------------- SFT dialogs

def load_messages_jsonl(path: str | os.PathLike, on_error: OnError = "raise",
                        on_special_tags: OnSpecialTags = "error") -> list[Dialog]:
    """`{"messages": [{"role", "content"}, ...]}` per line (a bare list is accepted too)."""
    def parse(obj: Any, where: str) -> Dialog:
        msgs = obj.get("messages", obj.get("conversations")) if isinstance(obj, dict) else obj
        if msgs is None:
            raise DataError(f"{where}: expected an object with a 'messages' list")
        return _dialog(msgs, where, end="assistant")
    return _load(path, parse, on_error, on_special_tags)


def alpaca_to_dialog(d: Any, where: str) -> Dialog:
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected an object with 'instruction' and 'output'")
    instruction = _str(d, "instruction", where, "an Alpaca record")
    output = _str(d, "output", where, "an Alpaca record")
    inp = d.get("input") or ""
    if not isinstance(inp, str):
        raise DataError(f"{where}: expected 'input' to be a string")
    dialog: Dialog = []
    if isinstance(d.get("system"), str) and d["system"].strip():
        dialog.append({"role": "system", "content": d["system"]})
    for turn in d.get("history") or []:
        if (not isinstance(turn, (list, tuple)) or len(turn) != 2
                or not all(isinstance(x, str) for x in turn)):
            raise DataError(f"{where}: expected 'history' as a list of [user, assistant] pairs")
        dialog += [{"role": "user", "content": turn[0]},
                   {"role": "assistant", "content": turn[1]}]
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    return dialog + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def load_alpaca(path: str | os.PathLike, on_error: OnError = "raise",
                on_special_tags: OnSpecialTags = "error") -> list[Dialog]:
    """Alpaca JSON array (or JSONL) of {instruction, input, output[, system, history]}."""
    return _load(path, alpaca_to_dialog, on_error, on_special_tags)


def load_seed_tasks(path: str | os.PathLike, on_error: OnError = "raise",
                    on_special_tags: OnSpecialTags = "error") -> list[Dialog]:
    """Self-Instruct / Stanford Alpaca `seed_tasks.jsonl`: one dialog per instance."""
    out: list[Dialog] = []
    tags = SpecialTagFilter(path, on_special_tags)
    for lineno, obj in _records(path):
        where = f"{path}:{lineno}"
        try:
            if isinstance(obj, DataError):
                raise obj
            if not isinstance(obj, dict) or not isinstance(obj.get("instances"), list):
                raise DataError(f"{where}: expected a seed task with an 'instances' list")
            instr = _str(obj, "instruction", where, "a seed task")
            dialogs = [alpaca_to_dialog({"instruction": instr, **inst}, where)
                       for inst in obj["instances"]]
            if tags.keep(dialogs, obj, where):
                out += dialogs
        except DataError as e:
            _handle(e, on_error)
    tags.summary()
    return out


def load_sft(path: str | os.PathLike, on_error: OnError = "raise",
             on_special_tags: OnSpecialTags = "error") -> list[Dialog]:
    """Any SFT file: messages JSONL, Alpaca JSON/JSONL, or seed tasks; detected per record."""
    def parse(obj: Any, where: str) -> list[Dialog]:
        if isinstance(obj, dict) and "instances" in obj:
            return [alpaca_to_dialog({"instruction": obj.get("instruction"), **i}, where)
                    for i in obj["instances"]]
        if isinstance(obj, dict) and "instruction" in obj:
            return [alpaca_to_dialog(obj, where)]
        if isinstance(obj, list) or (isinstance(obj, dict)
                                     and ("messages" in obj or "conversations" in obj)):
            msgs = obj if isinstance(obj, list) else obj.get("messages", obj.get("conversations"))
            return [_dialog(msgs, where, end="assistant")]
        raise DataError(f"{where}: expected a 'messages' list or an Alpaca record")
    return [d for ds in _load(path, parse, on_error, on_special_tags) for d in ds]


# ---------------------------------------------------------------------- preferences

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str, where: str) -> Dialog:
    """"\\n\\nHuman: ...\\n\\nAssistant: ..." into turns (consecutive same-role turns merged)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: expected a transcript starting with '\\n\\nHuman:'")
    dialog: Dialog = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if dialog and dialog[-1]["role"] == role:
            dialog[-1]["content"] += "\n\n" + content
        else:
            dialog.append({"role": role, "content": content})
    if dialog[0]["role"] != "user":
        raise DataError(f"{where}: expected the first turn to be Human")
    return dialog


def _drop_trailing_user(dialog: Dialog) -> Dialog:
    return dialog[:-1] if len(dialog) > 2 and dialog[-1]["role"] == "user" else dialog


def load_hh_rlhf(path: str | os.PathLike, on_error: OnError = "raise",
                 source: str | None = None,
                 on_special_tags: OnSpecialTags = "error") -> list[PreferencePair]:
    """Anthropic HH-RLHF `{"chosen","rejected"}` transcripts (`.jsonl` or `.jsonl.gz`).

    The context is the chosen transcript up to its last Human turn; chosen/rejected are the
    final Assistant turns. `source` defaults to "hh-rlhf:<folder name>" (e.g. harmless-base).
    """
    p = Path(path)
    src = source or f"hh-rlhf:{p.parent.name}"

    def parse(obj: Any, where: str) -> PreferencePair:
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected an object with 'chosen' and 'rejected'")
        ch = parse_hh_transcript(_str(obj, "chosen", where, "an HH-RLHF record"), where)
        rj = parse_hh_transcript(_str(obj, "rejected", where, "an HH-RLHF record"), where)
        # A few released records (helpful-online lines 786, 1056) carry the user's next turn
        # after the answer; the answer is still the last Assistant turn, so drop that tail.
        ch, rj = _drop_trailing_user(ch), _drop_trailing_user(rj)
        if len(ch) < 2 or len(rj) < 2:
            raise DataError(f"{where}: expected both transcripts to end with an Assistant turn")
        return PreferencePair(dialog=ch[:-1], chosen=ch[-1]["content"],
                              rejected=rj[-1]["content"], source=src)
    return _load(p, parse, on_error, on_special_tags)


def _response(v: Any, where: str, key: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("value", v.get("content")), str):
        return v.get("value", v.get("content"))
    if isinstance(v, list) and v and isinstance(v[-1], dict):  # a full message list
        return _response(v[-1], where, key)
    raise DataError(f"{where}: expected {key!r} as a string or a message")


def load_preferences_jsonl(path: str | os.PathLike, on_error: OnError = "raise",
                           source: str | None = None,
                           on_special_tags: OnSpecialTags = "error") -> list[PreferencePair]:
    """Preference pairs: `{"dialog"|"messages"|"conversations"|"prompt", "chosen", "rejected",
    "level"?, "safety_bin"?}` per JSONL line or JSON array element. `level` must be one of
    RATING_LEVELS and `safety_bin` one of SAFETY_BINS when present."""
    src = source or Path(path).name

    def parse(obj: Any, where: str) -> PreferencePair:
        if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
            raise DataError(f"{where}: expected an object with 'chosen' and 'rejected'")
        if isinstance(obj.get("prompt"), str):
            dialog = [{"role": "user", "content": obj["prompt"]}]
        else:
            msgs = obj.get("dialog", obj.get("messages", obj.get("conversations")))
            dialog = _dialog(msgs, where, end="user")
        level, sbin = obj.get("level"), obj.get("safety_bin")
        if level is not None and level not in RATING_LEVELS:
            raise DataError(f"{where}: expected 'level' in {RATING_LEVELS}, got {level!r}")
        if sbin is not None and sbin not in SAFETY_BINS:
            raise DataError(f"{where}: expected 'safety_bin' in {SAFETY_BINS}, got {sbin!r}")
        return PreferencePair(dialog=dialog, chosen=_response(obj["chosen"], where, "chosen"),
                              rejected=_response(obj["rejected"], where, "rejected"),
                              level=level, safety_bin=sbin,
                              source=obj.get("source") or src, aspect=obj.get("aspect"))
    return _load(path, parse, on_error, on_special_tags)


# ---------------------------------------------------------------------- pretraining text

def load_pretraining_text(path: str | os.PathLike, on_error: OnError = "raise") -> Iterator[str]:
    """Documents: `.txt` split on blank lines (or one per line if it has none); `.jsonl` with
    a "text" field; either may be gzipped."""
    p = Path(path)
    name = p.name[:-3] if p.name.endswith(".gz") else p.name
    if name.endswith((".jsonl", ".json")):
        for lineno, obj in _records(p):
            try:
                if isinstance(obj, DataError):
                    raise obj
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f"{p}:{lineno}: expected an object with a string 'text'")
                yield obj["text"]
            except DataError as e:
                _handle(e, on_error)
        return
    with _open_text(p) as f:
        text = f.read()
    docs = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.splitlines()
    for d in docs:
        if d.strip():
            yield d.strip()


# ---------------------------------------------------------------------- evaluation sets

def load_xstest(path: str | os.PathLike,
                on_special_tags: OnSpecialTags = "error") -> list[Prompt]:
    """XSTest CSV: `safe` rows become borderline prompts, `unsafe` rows safety prompts."""
    p = Path(path)
    out: list[Prompt] = []
    tags = SpecialTagFilter(p, on_special_tags)
    with _open_text(p) as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows, 2):
        if not row.get("prompt") or row.get("label") not in ("safe", "unsafe"):
            raise DataError(f"{p}:{i}: expected a 'prompt' and a 'label' of safe/unsafe")
        if not tags.keep([{"role": "user", "content": row["prompt"]}],
                         {"prompt": row["prompt"]}, f"{p}:{i}"):
            continue
        safe = row["label"] == "safe"
        out.append(Prompt(id=f"xstest-{row.get('id', i)}",
                          dialog=[{"role": "user", "content": row["prompt"]}],
                          kind="borderline" if safe else "safety",
                          family=row.get("type") or "xstest",
                          category=None if safe else "xstest",
                          meta={"focus": row.get("focus"), "note": row.get("note"),
                                "source": "xstest"}))
    tags.summary()
    return out


# ---------------------------------------------------------------------- Hugging Face

def load_hf_dataset(name: str, split: str = "train", kind: str = "auto",
                    config: str | None = None,
                    on_special_tags: OnSpecialTags = "error") -> list[Any]:
    """A Hugging Face dataset, converted by its columns (kind "auto"), or as `kind`:
    "messages"/"alpaca" -> dialogs, "preferences"/"hh" -> PreferencePair, "text" -> str."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(f"{name}: loading a Hugging Face dataset needs the `datasets` package "
                        "(pip install datasets) and a network; or download the files and "
                        "use a file loader") from None
    ds = datasets.load_dataset(name, config, split=split)
    cols = set(ds.column_names)
    if kind == "auto":
        kind = ("messages" if "messages" in cols else
                "hh" if {"chosen", "rejected"} <= cols and isinstance(ds[0]["chosen"], str)
                and "Human:" in ds[0]["chosen"] else
                "preferences" if {"chosen", "rejected"} <= cols else
                "alpaca" if {"instruction", "output"} <= cols else
                "text" if "text" in cols else "")
    out: list[Any] = []
    tags = SpecialTagFilter(f"{name}[{split}]", on_special_tags)
    for i, row in enumerate(ds):
        where = f"{name}[{split}]:{i}"
        if kind == "messages":
            out.append(_dialog(row["messages"], where, end="assistant"))
        elif kind == "alpaca":
            out.append(alpaca_to_dialog(row, where))
        elif kind == "hh":
            ch = parse_hh_transcript(row["chosen"], where)
            rj = parse_hh_transcript(row["rejected"], where)
            out.append(PreferencePair(ch[:-1], ch[-1]["content"], rj[-1]["content"],
                                      source=f"hf:{name}"))
        elif kind == "preferences":
            if isinstance(row.get("prompt"), str):
                dialog = [{"role": "user", "content": row["prompt"]}]
            else:
                dialog = _dialog(row.get("messages") or row.get("conversations"), where,
                                 end="user")
            out.append(PreferencePair(dialog, _response(row["chosen"], where, "chosen"),
                                      _response(row["rejected"], where, "rejected"),
                                      source=f"hf:{name}"))
        elif kind == "text":
            out.append(row["text"])
        else:
            raise DataError(f"{name}: cannot tell the format from columns {sorted(cols)}; "
                            "pass kind=")
        if kind != "text" and not tags.keep(out[-1], row, where):  # text is no dialog
            out.pop()
    tags.summary()
    return out


# ---------------------------------------------------------------------- writers

def write_messages_jsonl(path: str | os.PathLike, dialogs: list[Dialog]) -> None:
    write_jsonl(path, ({"messages": d} for d in dialogs))


def write_preferences_jsonl(path: str | os.PathLike, pairs: list[PreferencePair]) -> None:
    write_jsonl(path, (p.to_dict() for p in pairs))


__all__ = [
    "DataError", "PreferencePair", "SpecialTagDataError", "SpecialTagFilter", "alpaca_to_dialog",
    "load_alpaca", "load_hf_dataset", "load_hh_rlhf", "load_messages_jsonl",
    "load_preferences_jsonl", "load_pretraining_text",
    "load_seed_tasks", "load_sft", "load_xstest", "parse_hh_transcript", "special_tag_error",
    "write_messages_jsonl", "write_preferences_jsonl",
]
