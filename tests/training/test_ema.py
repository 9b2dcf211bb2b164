"""The EMA of a run's weights (``models.<name>.ema``, pipeline.training.ema): the averaging
maths by hand, BatchNorm buffers averaged too, a self-describing ``train/ema.pt`` validated beside
the last weights, and a resumed run that continues the same average."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.core.curves import VAL
from pipeline.core.errors import PipelineError
from pipeline.core.runs import RunPaths
from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.training.ema import build_ema, ema_of

from test_loop import _assert_same_tensors, _cfg, _rows, _train
from test_resume import _interrupted_run


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def _train_step(net: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    net(x).square().mean().backward()  # train mode: BN's running statistics move too
    opt.step()


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_ema_of_two_steps_by_hand_and_decay_zero_is_the_model():
    decay = 0.9
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ema, copy = ema_of(net, decay), ema_of(net, 0.0)
    _train_step(net, opt, 1)
    w1 = _state(net)
    ema.update_parameters(net), copy.update_parameters(net)
    _train_step(net, opt, 2)
    w2 = _state(net)
    ema.update_parameters(net), copy.update_parameters(net)

    averaged = ema.module.state_dict()
    for k in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        assert not torch.equal(w1[k], w2[k]), k
        # the first update starts the average at the weights, the second moves it
        assert torch.allclose(averaged[k], decay * w1[k] + (1 - decay) * w2[k], atol=1e-7), k
    _assert_same_tensors(copy.module.state_dict(), _state(net))  # decay 0: the model itself
    assert int(ema.n_averaged) == 2
    assert build_ema(net, 0.0) is None and build_ema(net, 0.5) is not None


def test_ema_decay_is_checked(demo_workspace):
    for bad in (1.0, -0.1):
        with pytest.raises(PipelineError, match=r"models.tiny.ema.decay must be in \[0, 1\)"):
            _cfg(demo_workspace, ema={"decay": bad})
    assert _cfg(demo_workspace).ema.decay == 0.0  # off by default


def test_run_saves_validates_and_resumes_its_ema(demo_workspace, tmp_path, monkeypatch, capsys):
    ws = demo_workspace
    cfg = _cfg(ws, ema={"decay": 0.5})
    a, metrics_a = _train(ws, cfg, tmp_path / "a")
    ema_ckpt, last = load_checkpoint(a.ema), load_checkpoint(a.last)
    assert ema_ckpt["iteration"] == 12 and ema_ckpt["optimizer"] is None
    state = last["extra"]["ema"]
    assert int(state["n_averaged"]) == 12
    _assert_same_tensors(ema_ckpt["model"], {k[len("module."):]: v for k, v in state.items()
                                             if k.startswith("module.")})
    model, _ = model_from_checkpoint(a.ema)  # self-describing, like best.pt
    assert any(not torch.equal(v, last["model"][k]) for k, v in model.state_dict().items()
               if v.is_floating_point())
    # validated on the same frames at the same iterations as the last weights
    val = _rows(a, VAL)
    assert [r["iter"] for r in val] == [4, 8, 12] and all(r["ema_miou"] > 0 for r in val)
    assert metrics_a["ema_miou"] == pytest.approx(float(val[-1]["ema_miou"]), abs=1e-5)
    assert ema_ckpt["metric"]["miou"] == metrics_a["ema_miou"] and ema_ckpt["metric"]["iter"] == 12
    assert metrics_a["last_miou"] == last["metric"]["miou"]

    _interrupted_run(ws, cfg, tmp_path / "b", monkeypatch, at_call=7)
    b = RunPaths(tmp_path / "b" / a.root.name)
    assert int(load_checkpoint(b.last)["extra"]["ema"]["n_averaged"]) == 6
    capsys.readouterr()
    _, metrics_b = _train(ws, cfg, tmp_path / "b")
    assert "from iteration 6/12" in capsys.readouterr().out
    _assert_same_tensors(load_checkpoint(b.ema)["model"], ema_ckpt["model"])
    _assert_same_tensors(load_checkpoint(b.last)["extra"]["ema"], state)
    assert metrics_b["ema_miou"] == metrics_a["ema_miou"]
    assert _rows(b, VAL) == _rows(a, VAL)


def test_no_ema_by_default(demo_workspace, tmp_path):
    ws = demo_workspace
    paths, metrics = _train(ws, _cfg(ws, swa={"iters": 0}), tmp_path)
    assert not paths.ema.exists() and "ema_miou" not in metrics
    assert "ema" not in load_checkpoint(paths.last)["extra"]
    assert "ema_miou" not in _rows(paths, VAL)[0]
