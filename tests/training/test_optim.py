"""Parameter groups, optimizer registry and the warmup-poly / cyclic SWA schedules."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.models.build import build_model
from pipeline.training.optim import (build_optimizer, build_scheduler, cyclic, param_groups,
                                     swa_snapshot_iters, warmup_poly)


class TinyViTSeg(nn.Module):
    """Encoder with position embeddings and tokens, plus a decoder and a head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.encoder.pos_embed = nn.Parameter(torch.zeros(1, 16, 8))
        self.encoder.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.encoder.rel = nn.Module()
        self.encoder.rel.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.encoder.rel.no_weight_decay = lambda: {"gamma"}  # timm's convention
        self.encoder.rel.gamma = nn.Parameter(torch.ones(2, 8))
        self.encoder.norm = nn.LayerNorm(8)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        self.decoder = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
        self.segmentation_head = nn.Conv2d(8, 2, 1)


def _group_of(groups):
    return {id(p): g for g in groups for p in g["params"]}


@pytest.mark.parametrize("make", [
    lambda: build_model(arch="unet", encoder="resnet18", num_classes=3, decoder_channels=[8] * 5),
    TinyViTSeg,
])
def test_every_trainable_param_in_exactly_one_group(make):
    model = make()
    groups = param_groups(model, lr=0.01, weight_decay=0.05, head_lr_mult=10.0)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    assert set(ids) == {id(p) for p in trainable}
    group_of = _group_of(groups)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = group_of[id(p)]
        expected_mult = 1.0 if name.startswith("encoder.") else 10.0
        assert g["lr_mult"] == expected_mult and g["lr"] == pytest.approx(0.01 * expected_mult), name
        if p.ndim <= 1:  # norm weights and biases
            assert g["weight_decay"] == 0.0, name


def test_tokens_embeddings_and_declared_names_get_no_decay():
    model = TinyViTSeg()
    group_of = _group_of(param_groups(model, lr=1.0, weight_decay=0.1))
    decay = {n: group_of[id(p)]["weight_decay"] for n, p in model.named_parameters() if p.requires_grad}
    for name in ("encoder.pos_embed", "encoder.cls_token", "encoder.rel.relative_position_bias_table",
                 "encoder.rel.gamma", "encoder.norm.weight", "decoder.0.bias"):
        assert decay[name] == 0.0, name
    assert decay["encoder.patch.weight"] == decay["segmentation_head.weight"] == 0.1


def test_optimizer_registry():
    model = TinyViTSeg()
    assert isinstance(build_optimizer(model, lr=0.1, weight_decay=0.0), torch.optim.AdamW)
    sgd = build_optimizer(model, name="sgd", lr=0.1, weight_decay=1e-4, momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    with pytest.raises(PipelineError, match="unknown optimizer 'adam'.*adamw, sgd"):
        build_optimizer(model, name="adam", lr=0.1, weight_decay=0.0)


def test_warmup_poly_values():
    kw = dict(max_iters=100, warmup_iters=10, warmup_ratio=0.1)
    assert warmup_poly(0, **kw) == pytest.approx(0.1)
    assert warmup_poly(5, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_poly(10, **kw) == pytest.approx(1.0)
    assert warmup_poly(55, **kw) == pytest.approx(0.5)  # half-way through the decay
    assert warmup_poly(55, power=2.0, **kw) == pytest.approx(0.25)
    assert warmup_poly(55, min_lr_ratio=0.2, **kw) == pytest.approx(0.2 + 0.8 * 0.5)
    assert warmup_poly(100, min_lr_ratio=0.2, **kw) == pytest.approx(0.2)
    assert warmup_poly(0, max_iters=10, warmup_iters=0) == 1.0


def test_cyclic_values_restart_and_end_low():
    kw = dict(cycle_len=4, max_ratio=1.0, min_ratio=0.2)
    values = [cyclic(it, **kw) for it in range(8)]
    assert values[:4] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert values[4:] == values[:4]
    assert cyclic(5, cycle_len=1, max_ratio=1.0, min_ratio=0.3) == pytest.approx(0.3)


def _opt():
    return torch.optim.SGD(param_groups(TinyViTSeg(), lr=0.1, weight_decay=0.0, head_lr_mult=10.0),
                           lr=0.1)


SCHED = dict(max_iters=20, warmup_iters=4, warmup_ratio=0.25, swa_iters=12, swa_cycle=4,
             swa_max_ratio=0.5, swa_min_ratio=0.1)


def test_scheduler_follows_the_schedule_for_every_group():
    opt = _opt()
    sched = build_scheduler(opt, **SCHED)
    for it in range(SCHED["max_iters"] + SCHED["swa_iters"]):
        factor = (warmup_poly(it, max_iters=20, warmup_iters=4, warmup_ratio=0.25)
                  if it < 20 else cyclic(it - 20, cycle_len=4, max_ratio=0.5, min_ratio=0.1))
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(0.1 * g["lr_mult"] * factor), it
        if it in swa_snapshot_iters(max_iters=20, swa_iters=12, swa_cycle=4):
            assert factor == pytest.approx(0.1)
        opt.step(), sched.step()
    assert swa_snapshot_iters(max_iters=20, swa_iters=12, swa_cycle=4) == [23, 27, 31]


def test_scheduler_state_round_trips():
    opt, ref_opt = _opt(), _opt()
    sched, ref = build_scheduler(opt, **SCHED), build_scheduler(ref_opt, **SCHED)
    for _ in range(7):
        opt.step(), sched.step(), ref_opt.step(), ref.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = _opt()
    sched2 = build_scheduler(opt2, **SCHED)
    opt2.load_state_dict(state["opt"]), sched2.load_state_dict(state["sched"])
    for _ in range(20):
        assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in ref_opt.param_groups])
        opt2.step(), sched2.step(), ref_opt.step(), ref.step()


def test_scheduler_arguments_are_checked():
    with pytest.raises(PipelineError, match="swa_cycle"):
        build_scheduler(_opt(), max_iters=10, swa_iters=10, swa_cycle=3)
    with pytest.raises(PipelineError, match="warmup_iters"):
        build_scheduler(_opt(), max_iters=10, warmup_iters=10)
