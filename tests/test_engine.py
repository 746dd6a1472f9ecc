"""The shared training engine: optimizer, schedule, chunked loss, accumulation, Trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama2.config import ConfigError
from llama2.engine import (
    EpochSampler,
    TrainConfig,
    Trainer,
    causal_lm_loss,
    linear_cross_entropy,
    lm_loss_fn,
    lr_at,
    make_optimizer,
)
from llama2.model import Transformer, preset


def _cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-2, warmup_steps=2, max_steps=6, micro_batch_size=4, progress=False,
                seed=0, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_schedule_warmup_cosine_to_ten_percent() -> None:
    cfg = TrainConfig(lr=3e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(3e-5) and lr_at(9, cfg) == pytest.approx(3e-4)
    assert lr_at(60, cfg) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5))
    assert lr_at(110, cfg) == pytest.approx(3e-5) and lr_at(500, cfg) == pytest.approx(3e-5)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    const = TrainConfig(lr=1e-6, schedule="constant", warmup_steps=0, max_steps=100)
    assert {lr_at(s, const) for s in (0, 50, 99)} == {1e-6}
    # RM recipe: warmup 3% of steps, at least 5.
    assert TrainConfig(warmup_steps=5, warmup_ratio=0.03, max_steps=100).warmup() == 5
    assert TrainConfig(warmup_steps=5, warmup_ratio=0.03, max_steps=1000).warmup() == 30


def test_optimizer_settings_and_decay_groups() -> None:
    model = Transformer(preset("micro"))
    opt = make_optimizer(model, TrainConfig())
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert decayed["betas"] == (0.9, 0.95) and decayed["eps"] == 1e-5
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in
                                                                plain["params"])
    n_norms = 2 * model.args.n_layers + 1
    assert len(plain["params"]) == n_norms


def test_linear_cross_entropy_matches_reference() -> None:
    torch.manual_seed(0)
    h = torch.randn(150, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    t = torch.randint(0, 300, (150,))
    t[::5] = -100
    loss = linear_cross_entropy(h, w, t, chunk_size=32) / (t != -100).sum()
    loss.backward()
    h2, w2 = h.detach().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.t(), t)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(h.grad, h2.grad, atol=1e-6)
    assert torch.allclose(w.grad, w2.grad, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear_cross_entropy(h, w, t) / (t != -100).sum()
    assert low.item() == pytest.approx(ref.item(), rel=2e-2)
    with torch.no_grad():
        assert linear_cross_entropy(h, w, t).item() == pytest.approx(loss.item() * 120, rel=1e-5)


def test_causal_lm_loss_with_mask_matches_logits() -> None:
    torch.manual_seed(0)
    model = Transformer(preset("micro"))
    tokens = torch.randint(0, 256, (2, 12))
    targets = torch.randint(0, 256, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 7:] = True  # SFT: only answer tokens count
    loss, n = causal_lm_loss(model, tokens, targets, mask)
    ref = F.cross_entropy(model(tokens)[mask], targets[mask])
    assert n == 10 and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert model.output.weight.grad is not None and model.tok_embeddings.weight.grad is not None
    zero, n0 = causal_lm_loss(model, tokens, torch.full_like(targets, -100))
    assert n0 == 0 and zero.item() == 0.0


class _Tokens:
    """Fixed random token rows as a tiny dataset."""

    def __init__(self, n: int = 64, seq: int = 16, vocab: int = 256):
        g = torch.Generator().manual_seed(1)
        # A learnable pattern: every row counts up modulo vocab from a random start.
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        self.rows = [((starts[i] + torch.arange(seq + 1)) % vocab) for i in range(n)]

    @staticmethod
    def collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = torch.stack(rows)
        return {"tokens": x[:, :-1], "targets": x[:, 1:]}


def _train(run_dir: Path, **kw) -> tuple[Trainer, list[dict]]:
    torch.manual_seed(0)
    model = Transformer(preset("micro"))
    data = _Tokens()
    sampler = EpochSampler(data.rows, data.collate, seed=0)
    cfg = _cfg(**kw)
    trainer = Trainer(model, lm_loss_fn, sampler, cfg, run_dir,
                      eval_data=lambda: sampler.eval_batches(limit=2))
    return trainer, trainer.fit()


def test_trainer_run_directory_and_native_model(tmp_path: Path) -> None:
    import llama2

    trainer, hist = _train(tmp_path / "run", max_steps=12, eval_every=6, save_every=5,
                           global_batch=8, log_every=1, dtype="bfloat16")
    losses = [r["loss"] for r in hist if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    assert json.loads((run / "config.json").read_text())["global_batch"] == 8
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == \
        ["step_0000010.pt", "step_0000012.pt"]
    loaded = llama2.load(run / "model")
    assert loaded.extra["step"] == 12
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 12 and summary["per_rank"][0]["optimizer_bytes"] > 0
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        _train(tmp_path / "run", max_steps=12)


def test_auto_dtype_takes_bfloat16_only_where_it_is_fast(tmp_path: Path, monkeypatch) -> None:
    from llama2.engine import trainer as engine_trainer

    assert isinstance(engine_trainer.fast_bf16(torch.device("cpu")), bool)
    for fast, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(engine_trainer, "fast_bf16", lambda device, fast=fast: fast)
        trainer, hist = _train(tmp_path / want, max_steps=2, dtype="auto")
        assert trainer.cfg.dtype == want and len([r for r in hist if "loss" in r]) == 2


def test_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    _, big = _train(tmp_path / "a", micro_batch_size=8, global_batch=8)
    _, acc = _train(tmp_path / "b", micro_batch_size=2, global_batch=8)
    for a, b in zip(big, acc):
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_custom_model_loss_and_epochs(tmp_path: Path) -> None:
    """A reward-model-like module (Transformer + scalar head) with its own loss and epochs."""

    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = Transformer(preset("micro"))
            self.head = nn.Linear(32, 1, bias=False)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.transformer.hidden(tokens)[:, -1]).squeeze(-1)

    def loss_fn(model, batch):
        score = model(batch["tokens"])
        loss = F.mse_loss(score, batch["y"])
        return loss, {"mean_score": score.mean().item()}, len(score)

    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(0, 256, (8,), generator=g), float(i % 2)) for i in range(20)]

    def collate(items):
        return {"tokens": torch.stack([t for t, _ in items]),
                "y": torch.tensor([y for _, y in items])}

    saved = []
    trainer = Trainer(Scalar(), loss_fn, EpochSampler(examples, collate, seed=1),
                      _cfg(max_steps=0, epochs=2, warmup_steps=1), tmp_path / "rm",
                      on_save=lambda m, step: saved.append(step))
    hist = trainer.fit()
    assert trainer.step == 10 and saved == [10]  # 2 epochs x 20 examples / batch 4
    assert "mean_score" in hist[0] and not (tmp_path / "rm" / "model").exists()


def test_epoch_sampler_shuffles_per_epoch_and_resumes() -> None:
    s = EpochSampler(list(range(10)), list, micro_batch_size=5, seed=0, rank=0, world_size=1)
    e0 = s.next_batch() + s.next_batch()
    e1 = s.next_batch() + s.next_batch()
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1
    state = s.state_dict()
    nxt = s.next_batch()
    s2 = EpochSampler(list(range(10)), list, micro_batch_size=5, seed=0)
    s2.load_state_dict(state)
    assert s2.next_batch() == nxt and s.epoch == 2.5


def test_eval_pass_and_global_batch_are_the_same_on_any_number_of_processes() -> None:
    """The evaluation batches over all processes are the one-process pass (fillers keep the
    processes in step and count for nothing), and the micro-batch size shrinks where it does
    not split the global batch over the processes; the global batch never changes."""
    from llama2.engine.data import Filler

    def dealt(world: int, limit: int = 0) -> list[list[int]]:
        parts = [list(EpochSampler(list(range(11)), list, micro_batch_size=4, shuffle=False,
                                   rank=r, world_size=world).eval_batches(limit))
                 for r in range(world)]
        assert len({len(p) for p in parts}) == 1  # every process runs as many
        out = [parts[j % world][j // world] for j in range(len(parts[0]) * world)]
        return [b for b in out if not isinstance(b, Filler)]

    one = dealt(1)
    assert one == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0]]
    assert dealt(2) == dealt(3) == dealt(4) == one and dealt(2, limit=2) == one[:2]
    cfg = TrainConfig(micro_batch_size=16, global_batch=80)
    assert [cfg.micro_batch(w) for w in (1, 2, 4)] == [16, 10, 10]
    assert cfg.accumulation(1) == 5
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        cfg.micro_batch(3)


def test_bad_config_is_one_line_error() -> None:
    from llama2.stages.pretrain import parse_args

    with pytest.raises(ConfigError, match="unknown field 'lrr'; valid fields: .*lr"):
        parse_args(["--train.lrr", "1e-3"])
    with pytest.raises(ConfigError, match="unknown field 'dimm'"):
        parse_args(["--model.dimm", "3"])
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        _cfg(global_batch=10).accumulation(1)
    assert parse_args(["--resume"]).train.resume is True


def test_cli_reports_config_typo_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nlearning_rate = 1\n")
    out = subprocess.run([sys.executable, "-m", "llama2.cli", "pretrain", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown field 'learning_rate'" in lines[0]


def test_mfu_flops_formula() -> None:
    from llama2.engine.trainer import flops_per_token

    model = Transformer(preset("15M"))
    n = model.args.num_params() - model.args.vocab_size * model.args.dim
    assert flops_per_token(model, 256) == 6 * n + 12 * 6 * 288 * 256
    assert math.isfinite(flops_per_token(model, None))
