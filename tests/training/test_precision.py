"""Mixed precision (``models.<name>.amp``, pipeline.training.precision): fp16 with its gradient
scaler trains on the CPU, the scaler's state resumes exactly, a step with inf gradients is
skipped and counted, and the settings resolve (booleans of older params included)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.core.runs import RunPaths
from pipeline.models.checkpoint import load_checkpoint, restore_training_state, save_checkpoint
from pipeline.models.predict import autocast, resolve_amp
from pipeline.training.loop import NonFiniteLoss
from pipeline.training.resume import _compatible

from test_loop import CPU, _assert_same_tensors, _cfg, _iters, _loss_hook, _rows, _train
from test_resume import _interrupted_run


class _InfGradient(torch.autograd.Function):
    """The identity whose backward is infinite: a finite loss with inf gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_fp16_with_its_scaler_trains_on_the_cpu(demo_workspace, tmp_path):
    ws = demo_workspace
    paths, metrics = _train(ws, _cfg(ws, amp="fp16", swa={"iters": 0}), tmp_path)
    log = _rows(paths)
    assert _iters(paths) == list(range(1, 9))
    assert all(math.isfinite(float(r["loss"])) for r in log)
    assert float(log[-1]["loss"]) < float(log[0]["loss"])
    assert [int(r["skipped_steps"]) for r in log] == [0] * 8 and metrics["skipped_steps"] == 0
    ckpt = load_checkpoint(paths.last)
    assert ckpt["scaler"]["scale"] == 65536.0 and ckpt["scaler"]["_growth_tracker"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # the default (amp: true = auto) is float32 on the CPU: no scaler, no column
    plain, metrics = _train(ws, _cfg(ws, swa={"iters": 0}), tmp_path / "plain")
    assert load_checkpoint(plain.last)["scaler"] is None and "skipped_steps" not in _rows(plain)[0]
    assert metrics["skipped_steps"] == 0


def test_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    from pipeline.models.build import build_model

    model = build_model(arch="Unet", encoder="tu-test_resnet", num_classes=3,
                        decoder_channels=[16, 16, 8, 8, 8])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": 2})
    save_checkpoint(tmp_path / "last.pt", model=model, config={}, classes={}, fold=0, seed=0,
                    iteration=5, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu")
    assert restore_training_state(load_checkpoint(tmp_path / "last.pt"), scaler=fresh) == 5
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.get_scale() == 1024.0


def test_resumed_fp16_run_equals_an_uninterrupted_one(demo_workspace, tmp_path, monkeypatch,
                                                      capsys):
    ws = demo_workspace
    cfg = _cfg(ws, amp="fp16")
    a, metrics_a = _train(ws, cfg, tmp_path / "a")
    _interrupted_run(ws, cfg, tmp_path / "b", monkeypatch, at_call=7)
    b = RunPaths(tmp_path / "b" / a.root.name)
    assert load_checkpoint(b.last)["iteration"] == 6
    capsys.readouterr()
    _, metrics_b = _train(ws, cfg, tmp_path / "b")
    assert "from iteration 6/12" in capsys.readouterr().out
    for name in ("last.pt", "best.pt", "snapshots/swa_0000012.pt"):
        _assert_same_tensors(load_checkpoint(b.train_dir / name)["model"],
                             load_checkpoint(a.train_dir / name)["model"])
    assert load_checkpoint(b.last)["scaler"] == load_checkpoint(a.last)["scaler"]
    assert [{k: v for k, v in r.items() if k != "images_per_s"} for r in _rows(b)] == \
           [{k: v for k, v in r.items() if k != "images_per_s"} for r in _rows(a)]
    assert metrics_b["skipped_steps"] == metrics_a["skipped_steps"]


def test_inf_gradients_skip_the_step_and_are_counted(demo_workspace, tmp_path, monkeypatch):
    ws = demo_workspace
    cfg = _cfg(ws, amp="fp16", swa={"iters": 0}, grad_clip=1.0)
    clean, _ = _train(ws, cfg, tmp_path / "clean")

    def inf_at_3(call, loss, parts):
        return (_InfGradient.apply(loss) if call == 3 else loss), parts

    _loss_hook(monkeypatch, inf_at_3)
    paths, metrics = _train(ws, cfg, tmp_path / "inf")  # no NonFiniteLoss: the loss is finite
    assert metrics["skipped_steps"] == 1 and metrics["iterations"] == 8
    log = _rows(paths)
    assert [int(r["skipped_steps"]) for r in log] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert [r["loss"] for r in log[:4]] == [r["loss"] for r in _rows(clean)[:4]]
    ckpt = load_checkpoint(paths.last)
    assert ckpt["scaler"]["scale"] == 65536.0 / 2  # backed off once
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_nan_loss_under_fp16_still_stops_the_run(demo_workspace, tmp_path, monkeypatch):
    ws = demo_workspace
    _loss_hook(monkeypatch, lambda call, loss, parts: (loss * float("nan") if call == 2 else loss,
                                                       parts))
    with pytest.raises(NonFiniteLoss, match="loss is nan at iteration 2"):
        _train(ws, _cfg(ws, amp="fp16"), tmp_path)


def test_amp_settings_resolve_and_bad_ones_name_the_valid_values(demo_workspace, monkeypatch):
    cuda = torch.device("cuda")
    assert resolve_amp(True, CPU) is None and resolve_amp("auto", CPU) is None
    assert resolve_amp(False, cuda) is None and resolve_amp("off", cuda) is None
    assert resolve_amp("fp16", CPU) == torch.float16 and resolve_amp("bf16", CPU) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp(True, cuda) == torch.bfloat16 and resolve_amp("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", cuda) == torch.float16  # older GPUs: fp16 with the scaler

    conv = torch.nn.Conv2d(3, 2, 3)
    x = torch.randn(1, 3, 8, 8)
    for amp, dtype in ((True, torch.float32), ("off", torch.float32), ("fp16", torch.float16)):
        with autocast(CPU, amp):
            assert conv(x).dtype == dtype, amp

    ws = demo_workspace
    assert _cfg(ws, amp=False).model.amp is False and _cfg(ws, amp="bf16").model.amp == "bf16"
    for bad in ("fp32", 1, None):
        with pytest.raises(PipelineError) as err:
            _cfg(ws, amp=bad)
        message = str(err.value)
        assert "\n" not in message and "models.tiny.amp" in message
        assert "auto, bf16, fp16, off" in message
    with pytest.raises(PipelineError, match="auto, bf16, fp16, off"):
        resolve_amp("half", CPU)


def test_amp_true_checkpoints_resume_under_auto_but_not_under_fp16(demo_workspace):
    ws = demo_workspace
    config = {"run": _cfg(ws).to_dict(), "fold": 0, "seed": 0, "model": {"arch": "unet"}}
    assert config["run"]["amp"] is True  # as written: older checkpoints hold the boolean
    for same in ("auto", True):
        assert _compatible({"config": config}, {**config, "run": _cfg(ws, amp=same).to_dict()})
    assert not _compatible({"config": config}, {**config, "run": _cfg(ws, amp="fp16").to_dict()})
