"""Self-describing checkpoints: rebuild from the file alone, atomic writes, resume state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.data.manifest import ClassInfo
from pipeline.models.build import build_model
from pipeline.models.checkpoint import (FORMAT, load_checkpoint, model_from_checkpoint, restore_rng,
                                        restore_training_state, save_checkpoint)
from pipeline.training.optim import build_optimizer, build_scheduler

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CLASSES = ClassInfo(names=["sky", "road", "car"], palette=[[0, 0, 255], [128, 64, 128], [0, 0, 142]])
SPEC = {"arch": "unet", "encoder": "resnet18", "num_classes": 3,
        "decoder_channels": [16, 16, 8, 8, 8],
        "logit_adjust": {"tau": 0.5, "prior": [5.0, 3.0, 2.0]}}




def _model():
    return build_model(**SPEC)


def _out(model):
    with torch.no_grad():
        return model.eval()(X)


def _save(path, model, **kwargs):
    kwargs.setdefault("metric", {"miou": np.float64(0.5), "loss": 1.25})
    return save_checkpoint(path, model=model, config={"run": "r1", "model": SPEC, "lr": 1e-3},
                           classes=CLASSES, fold=2, seed=7, iteration=123, **kwargs)


def test_rebuilds_from_the_file_alone_with_identical_outputs(tmp_path):
    model = _model()
    with torch.no_grad():  # move BN statistics away from their defaults
        model.train()(X)
    path = _save(tmp_path / "ckpt.pt", model)
    rebuilt, ckpt = model_from_checkpoint(path)
    assert not rebuilt.training
    assert torch.equal(_out(model), _out(rebuilt))
    assert ckpt["fold"] == 2 and ckpt["seed"] == 7 and ckpt["iteration"] == 123
    assert ckpt["metric"] == {"miou": 0.5, "loss": 1.25}
    assert ckpt["config"]["run"] == "r1" and ckpt["config"]["model"]["arch"] == "unet"
    assert ckpt["classes"]["names"] == CLASSES.names
    assert ckpt["format"] == FORMAT and "torch" in ckpt["versions"]
    # the prior travels in the config: train mode still adds it to the rebuilt model
    rebuilt.segmentation_head.train()
    with torch.no_grad():
        assert not torch.allclose(rebuilt(X), _out(model))


def test_wrapper_prefixes_are_stripped(tmp_path):
    model = _model()
    for wrapped in (torch.nn.DataParallel(model), torch.compile(model)):
        ckpt = load_checkpoint(_save(tmp_path / "w.pt", wrapped))
        assert set(ckpt["model"]) == set(model.state_dict())


def test_spec_falls_back_to_the_one_build_model_recorded(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path / "c.pt", model=model, config={}, classes={"names": ["a"]},
                           fold=None, seed=0, iteration=0, metric=None)
    rebuilt, ckpt = model_from_checkpoint(path)
    assert torch.equal(_out(model), _out(rebuilt))
    assert ckpt["metric"] is None and ckpt["fold"] is None


def test_atomic_write_leaves_no_temp_files(tmp_path):
    model = _model()
    _save(tmp_path / "a.pt", model)
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
    with pytest.raises(TypeError, match="extra.bad"):
        _save(tmp_path / "b.pt", model, extra={"bad": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_bad_files_raise_pipeline_errors_naming_them(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(PipelineError, match="corrupt.pt: not a readable checkpoint"):
        load_checkpoint(corrupt)
    with pytest.raises(PipelineError, match="missing.pt: checkpoint not found"):
        model_from_checkpoint(tmp_path / "missing.pt")
    bare = tmp_path / "bare.pt"
    torch.save(_model().state_dict(), bare)
    with pytest.raises(PipelineError, match="bare.pt: not a pipeline checkpoint"):
        load_checkpoint(bare)


def test_rng_states_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt = load_checkpoint(_save(tmp_path / "r.pt", _model()))
    first = (random.random(), np.random.rand(), torch.rand(3))
    assert restore_rng(ckpt)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    assert not restore_rng(load_checkpoint(_save(tmp_path / "n.pt", _model(), rng_state=False)))


def test_training_state_resumes(tmp_path):
    model = _model()
    opt = build_optimizer(model, lr=1e-3, weight_decay=1e-4, head_lr_mult=10.0)
    sched = build_scheduler(opt, max_iters=20, warmup_iters=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    for _ in range(3):
        model.train()(X).mean().backward()
        opt.step(), opt.zero_grad(), sched.step()
    path = _save(tmp_path / "t.pt", model, optimizer=opt, scheduler=sched, scaler=scaler)

    model2, ckpt = model_from_checkpoint(path)
    opt2 = build_optimizer(model2, lr=1e-3, weight_decay=1e-4, head_lr_mult=10.0)
    sched2 = build_scheduler(opt2, max_iters=20, warmup_iters=5)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1.0)
    assert restore_training_state(ckpt, optimizer=opt2, scheduler=sched2, scaler=scaler2) == 123
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert sched2.last_epoch == sched.last_epoch and scaler2.get_scale() == 512.0
    p, p2 = model.encoder.conv1.weight, model2.encoder.conv1.weight
    assert torch.equal(opt.state[p]["exp_avg"], opt2.state[p2]["exp_avg"])


@pytest.mark.gpu
def test_cuda_model_and_rng_round_trip(tmp_path):
    model = _model().cuda()
    torch.cuda.manual_seed_all(3)
    path = _save(tmp_path / "g.pt", model)
    first = torch.rand(4, device="cuda")
    rebuilt, ckpt = model_from_checkpoint(path)  # map_location="cpu": loads without a GPU too
    assert next(rebuilt.parameters()).device.type == "cpu"
    assert torch.equal(_out(model.cpu()), _out(rebuilt))
    restore_rng(ckpt)
    assert torch.equal(torch.rand(4, device="cuda"), first)


def test_two_saves_of_the_same_state_are_byte_identical(tmp_path):
    """No save time, and the archive's inner folder is not named after the random temporary
    file: a stage that re-saves the same weights leaves DVC nothing to re-run."""
    import time
    import zipfile

    from pipeline.models.checkpoint import weights_digest

    model = _model()
    a = _save(tmp_path / "a.pt", model, rng_state=False)
    time.sleep(1.1)  # a saved time would differ now
    b = _save(tmp_path / "sub" / "b.pt", model, rng_state=False)
    assert a.read_bytes() == b.read_bytes()
    assert all(n.startswith("archive/") for n in zipfile.ZipFile(a).namelist())
    _save(a, model, rng_state=False)
    assert a.read_bytes() == b.read_bytes()
    # weights_digest: the weights only, whatever else the file holds
    digest = weights_digest(load_checkpoint(a)["model"])
    assert digest == weights_digest(model.state_dict())
    assert digest == weights_digest(load_checkpoint(_save(tmp_path / "c.pt", model))["model"])
    with torch.no_grad():
        model.encoder.conv1.weight[0, 0, 0, 0] += 1e-6
    assert weights_digest(model.state_dict()) != digest
