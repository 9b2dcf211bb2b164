"""Gradient accumulation (``models.<name>.accum_steps``): N forwards of B images step as one
forward of N * B, iterations count optimizer steps, and an interrupted run resumes exactly."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.curves import VAL
from pipeline.core.device import Dist
from pipeline.core.errors import PipelineError
from pipeline.core.names import run_name
from pipeline.core.runs import RunPaths
from pipeline.models.checkpoint import load_checkpoint
from pipeline.training import loop
from pipeline.training.resume import _compatible
from pipeline.training.run_setup import set_up

from test_loop import CPU, _assert_same_tensors, _cfg, _data, _iters, _rows, _train
from test_resume import _interrupted_run

# GroupNorm only (no batch statistics): a batch of 8 and two of 4 give the same gradients
GN = {"encoder": "tu-test_efficientnet_gn",
      "arch_kwargs": {"decoder_channels": [16, 16, 8, 8, 8], "decoder_use_norm": "identity"},
      "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
      "swa": {"iters": 0}, "iters": 4}


def _step(ws, tmp_path, *, batch_size: int, accum_steps: int, images, masks) -> dict:
    """The weights after one optimizer step of a run set up from the GN config on ``images``."""
    cfg = _cfg(ws, batch_size=batch_size, accum_steps=accum_steps, **GN)
    run = set_up(cfg=cfg, paths=RunPaths(tmp_path / run_name(cfg.name, 0, 0)), fold=0, seed=0,
                 data=_data(ws), device=CPU, teacher=None, dist=Dist(), deterministic=True)
    batches = iter([{"image": x, "mask": y}
                    for x, y in zip(images.split(batch_size), masks.split(batch_size))])
    loss, parts, n = loop._accumulate(run, run.model, batches)
    assert n == 8 and next(batches, None) is None  # every forward of the step, no more
    loop._update(run)
    return {"loss": loss, "parts": parts,
            "weights": {k: v.clone() for k, v in run.model.state_dict().items()}}


def test_two_batches_of_4_step_as_one_batch_of_8(demo_workspace, tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=gen)
    masks = torch.randint(0, 3, (8, 32, 32), generator=gen)  # no void: the same pixel mean
    one = _step(demo_workspace, tmp_path / "a", batch_size=8, accum_steps=1, images=images,
                masks=masks)
    two = _step(demo_workspace, tmp_path / "b", batch_size=4, accum_steps=2, images=images,
                masks=masks)
    four = _step(demo_workspace, tmp_path / "c", batch_size=2, accum_steps=4, images=images,
                 masks=masks)
    other_target = _step(demo_workspace, tmp_path / "d", batch_size=8, accum_steps=1,
                    images=images, masks=masks * 0)["weights"]  # another target: another step
    for other in (two, four):
        assert other["loss"].item() == pytest.approx(one["loss"].item(), rel=1e-5)
        assert other["weights"].keys() == one["weights"].keys()
        for k, v in one["weights"].items():
            assert torch.allclose(other["weights"][k], v, rtol=1e-4, atol=1e-6), k
    assert any(not torch.allclose(other_target[k], v) for k, v in one["weights"].items())


def test_accumulating_run_counts_optimizer_steps_and_resumes_exactly(demo_workspace, tmp_path,
                                                                     monkeypatch, capsys):
    ws = demo_workspace
    cfg = _cfg(ws, batch_size=2, accum_steps=2)  # 8 + 4 SWA steps of 2 x 2 images
    a, metrics_a = _train(ws, cfg, tmp_path / "a")
    assert _iters(a) == list(range(1, 13)) and metrics_a["iterations"] == 12
    assert [int(r["iter"]) for r in _rows(a, VAL)] == [4, 8, 12]
    assert sorted(p.name for p in a.snapshots.iterdir()) == ["swa_0000010.pt", "swa_0000012.pt"]
    plain, _ = _train(ws, _cfg(ws), tmp_path / "plain")  # the same schedule over steps
    assert [r["lr"] for r in _rows(a)] == [r["lr"] for r in _rows(plain)]

    _interrupted_run(ws, cfg, tmp_path / "b", monkeypatch, at_call=13)  # forward 2 of step 7
    b = RunPaths(tmp_path / "b" / a.root.name)
    assert load_checkpoint(b.last)["iteration"] == 6
    capsys.readouterr()
    _, metrics_b = _train(ws, cfg, tmp_path / "b")
    assert f"resuming {a.root.name} from iteration 6/12" in capsys.readouterr().out
    for name in ("last.pt", "best.pt", "snapshots/swa_0000012.pt"):
        _assert_same_tensors(load_checkpoint(b.train_dir / name)["model"],
                             load_checkpoint(a.train_dir / name)["model"])
    assert [{k: v for k, v in r.items() if k != "images_per_s"} for r in _rows(b)] == \
           [{k: v for k, v in r.items() if k != "images_per_s"} for r in _rows(a)]
    assert metrics_b["last_miou"] == metrics_a["last_miou"]


def test_accum_steps_must_be_positive_and_old_checkpoints_ran_with_one(demo_workspace):
    ws = demo_workspace
    with pytest.raises(PipelineError, match="accum_steps must be >= 1"):
        _cfg(ws, accum_steps=0)
    config = {"run": _cfg(ws).to_dict(), "fold": 0, "seed": 0, "model": {"arch": "unet"}}
    older = {"config": {**config, "run": {k: v for k, v in config["run"].items()
                                          if k not in ("accum_steps", "ema")}}}
    assert _compatible(older, config)
    accum = {**config, "run": _cfg(ws, accum_steps=2).to_dict()}
    assert not _compatible(older, accum) and not _compatible({"config": config}, accum)
