"""`llama2 <command> ...`: a thin dispatcher; each command lives in its own module.

Every module named here exposes `main(argv: list[str]) -> None`. Modules are imported only
when their command runs, so `llama2 --help` is fast and stages stay independent.

Under torchrun every command follows one rule (engine/distributed.py): the ranks share the
work, only rank 0 writes and logs, and a command in RANK0_ONLY runs on rank 0 alone while the
others wait, after one line that says so. A bad launch (`LaunchError`: found the same way on
every rank) is one line from rank 0; the command's run-directory lock goes when it ends.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("llama2.commands", "convert: checkpoint format conversion (hf, native)"),
    "generate": ("llama2.commands", "generate: sample continuations of prompts"),
    "chat": ("llama2.serve.chat", "chat: interactive chat in the terminal"),
    "serve": ("llama2.serve.server", "serve: OpenAI-compatible HTTP server"),
    "tokenizer": ("llama2.stages.tokenizer", "tokenizer train: train a SentencePiece BPE model"),
    "prepare": ("llama2.data.pretrain", "prepare: tokenize a corpus into shards"),
    "pretrain": ("llama2.stages.pretrain", "pretrain: pretraining (recipe §1)"),
    "world": ("llama2.world.cli", "world export|calibrate: the built-in assistant world"),
    "sft": ("llama2.stages.sft", "sft: supervised fine-tuning (recipe §2)"),
    "preferences": ("llama2.stages.preferences", "preferences: collect comparisons (recipe §3)"),
    "reward": ("llama2.stages.reward", "reward: train/evaluate a reward model (recipe §4)"),
    "rejection-sample": ("llama2.stages.rejection_sampling",
                         "rejection-sample: rejection sampling fine-tuning (recipe §5)"),
    "rs-forgetting": ("llama2.stages.rejection_sampling",
                      "rs-forgetting: what keeping only the latest round's samples forgets (§3.2.3)"),
    "ppo": ("llama2.stages.ppo", "ppo: PPO with the two-RM reward (recipe §6)"),
    "rlhf": ("llama2.stages.rlhf", "rlhf: iterative RLHF rounds"),
    "gatt": ("llama2.stages.gatt", "gatt: Ghost Attention (recipe §7)"),
    "distill": ("llama2.stages.distill", "distill: safety context distillation (recipe §8)"),
    "eval": ("llama2.eval.cli", "eval: evaluation suites"),
    "report": ("llama2.eval.report", "report: write report.md/html for a run directory"),
    "pipeline": ("llama2.stages.pipeline", "pipeline: the whole recipe on the embedded default"),
}


# Commands that are not distributed (yet): tools and interactive commands.
RANK0_ONLY = {"convert", "chat", "serve", "tokenizer", "prepare", "world", "report"}


def _usage() -> str:
    lines = ["usage: llama2 <command> [args...]", "", "commands:"]
    lines += [f"  {name:<17} {help_.split(': ', 1)[1]}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    program = argv is None  # started as a program, not called from Python
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"llama2: unknown command {name!r}; known: {', '.join(COMMANDS)}")
    if program:  # threads for the cores this process gets, before torch starts its pools
        from llama2 import runtime

        runtime.configure()
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            sys.exit(f"llama2 {name}: not available in this version")
        raise
    entry = getattr(module, "main_" + name.replace("-", "_"), None) or module.main
    from llama2.engine import distributed

    try:
        with distributed.rank0_logs():
            if name in RANK0_ONLY:
                distributed.rank0_only(f"llama2 {name}", lambda: entry(rest))
            else:
                entry(rest)
        distributed.shutdown()
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, FileNotFoundError, OSError) as e:
        # Bad input is a one-line error, not a traceback (set LLAMA2_DEBUG=1 for one).
        import os

        if os.environ.get("LLAMA2_DEBUG"):
            raise
        if isinstance(e, distributed.LaunchError):  # every rank has it: said once, by rank 0
            distributed.exit_on_launch_error(f"llama2 {name}: error: {e}")
        sys.exit(f"llama2 {name}: error: {e}")
    finally:
        # The command is over: its run directory's lock goes (contract.claim), also when
        # called from Python; imported only if the command took one.
        contract = sys.modules.get("llama2.stages.contract")
        if contract is not None:
            contract.release()


if __name__ == "__main__":
    main()
