"""`llama2 convert`, `llama2 generate` and `llama2 chat` as a user runs them."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from conftest import shared_file
from llama2 import checkpoint
from llama2.commands import load_for_inference
from llama2.serve.chat import ChatSession, run


def llama2_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama2.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_convert_llama2c_to_hf_and_native_then_generate(tmp_path):
    src = shared_file("tinyllamas-stories260K", "stories260K.bin")
    r = llama2_cli("convert", str(src), str(tmp_path / "hf"), "--to", "hf")
    assert r.returncode == 0, r.stderr
    r = llama2_cli("convert", str(tmp_path / "hf"), str(tmp_path / "native"))
    assert r.returncode == 0, r.stderr
    a, b = checkpoint.load(src), checkpoint.load(tmp_path / "native")
    x = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        assert (a.model(x) - b.model(x)).abs().max() < 1e-5
    r = llama2_cli("generate", "--model", str(tmp_path / "native"), "--prompt",
                   "Once upon a time", "--max-new-tokens", "20")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time, there was a little")


def test_cli_errors_are_one_line(tmp_path):
    r = llama2_cli("generate", "--model", str(tmp_path / "nope"))
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "no such file or directory" in r.stderr
    r = llama2_cli("frobnicate")
    assert r.returncode != 0 and "unknown command 'frobnicate'" in r.stderr


def test_chat_session_keeps_dialog_and_commands(tmp_path):
    loaded = load_for_inference(str(shared_file("tinyllamas-stories260K", "stories260K.bin")))
    session = ChatSession(loaded, max_new_tokens=8)
    out = io.StringIO()
    save = tmp_path / "dialog.json"
    script = f"Hello\nHow are you?\n/save {save}\n/system Be nice.\n/save {save}.2\n/reset\n"
    run(session, io.StringIO(script), out)
    saved = json.loads(save.read_text())
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]
    assert saved[0]["content"] == "Hello"
    after_system = json.loads((tmp_path / "dialog.json.2").read_text())
    assert after_system == [{"role": "system", "content": "Be nice."}]
    assert "[dialog reset]" in out.getvalue()


def test_chat_prompt_too_long_is_reported(tmp_path):
    loaded = load_for_inference(str(shared_file("tinyllamas-stories260K", "stories260K.bin")))
    session = ChatSession(loaded, max_new_tokens=8)
    with pytest.raises(ValueError, match="longer than the context of 512"):
        session.reply("word " * 600)
