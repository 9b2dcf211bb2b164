"""Tests for pipeline.training.losses: good < bad, ignore pixels, OHEM rule, distillation, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.core.errors import PipelineError
from pipeline.models.prior import log_prior, logit_adjustment_bias
from pipeline.training.losses import (IGNORE_INDEX, build_loss, cross_entropy, distillation_loss, list_losses,
                                      loss_options, ohem_cross_entropy, ohem_mask, scaled_min_kept)

B, C, H, W = 2, 4, 6, 6
PLAIN = ["ce", "ohem", "dice", "lovasz", "focal"]  # forward(logits, target)


def _target(seed: int = 0, ignore_frac: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < ignore_frac] = IGNORE_INDEX
    return target


def _onehot_logits(labels: torch.Tensor, scale: float = 4.0) -> torch.Tensor:
    """Logits [B, C, H, W] favouring ``labels`` (ignored pixels favour class 0)."""
    safe = labels.masked_fill(labels == IGNORE_INDEX, 0)
    return scale * F.one_hot(safe, C).permute(0, 3, 1, 2).float()


def _loss(name: str, **options):
    spec = {"name": name, **options}
    if name == "ohem":
        spec.setdefault("min_kept", 5)
    return build_loss(spec)


def _value(loss, logits, target, teacher=None):
    return loss(logits, target, teacher_logits=teacher)[0]


def reference_ohem(logits, target, *, thresh, min_kept, ignore_index=IGNORE_INDEX):
    """MMSeg OHEMPixelSampler, written out pixel by pixel."""
    prob = logits.float().softmax(dim=1)
    b, _, h, w = logits.shape
    picked = {}
    for i in range(b):
        for y in range(h):
            for x in range(w):
                label = int(target[i, y, x])
                if label != ignore_index:
                    picked[(i, y, x)] = float(prob[i, label, y, x])
    ordered = sorted(picked.values())
    min_threshold = ordered[min(min_kept * b, len(ordered) - 1)] if ordered else 0.0
    threshold = max(min_threshold, thresh)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    for pos, p in picked.items():
        mask[pos] = p < threshold
    return mask


# ----------------------------------------------------------------------------- every loss
@pytest.mark.parametrize("name", PLAIN)
def test_good_prediction_scores_lower_than_bad(name):
    target = _target()
    good = _onehot_logits(target)
    bad = _onehot_logits((target + 1) % C)
    loss = _loss(name)
    assert _value(loss, good, target) < _value(loss, bad, target)


@pytest.mark.parametrize("name", PLAIN + ["distill"])
def test_ignored_pixels_never_change_the_value(name):
    target = _target(1, ignore_frac=0.3)
    a = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(2))
    b = torch.where((target == IGNORE_INDEX).unsqueeze(1), 10 * torch.randn(B, C, H, W), a)
    assert not torch.equal(a, b)
    loss = _loss(name, labelled_only=True) if name == "distill" else _loss(name)
    teacher = torch.randn(B, C, H, W) if name == "distill" else None
    torch.testing.assert_close(_value(loss, a, target, teacher), _value(loss, b, target, teacher))


@pytest.mark.parametrize("name", PLAIN + ["distill"])
def test_gradients_flow(name):
    logits = torch.randn(B, C, H, W, requires_grad=True)
    target = _target(3)
    teacher = torch.randn(B, C, H, W, requires_grad=True) if name == "distill" else None
    total, _ = _loss(name)(logits, target, teacher_logits=teacher)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    if teacher is not None:
        assert teacher.grad is None  # the teacher is detached


@pytest.mark.parametrize("name", PLAIN + ["lovasz_per_image"])
def test_unlabelled_batch_gives_zero_with_grad(name):
    loss = _loss("lovasz", per_image=True) if name == "lovasz_per_image" else _loss(name)
    logits = torch.randn(B, C, H, W, requires_grad=True)
    target = torch.full((B, H, W), IGNORE_INDEX)
    total, _ = loss(logits, target)
    assert total.item() == 0.0
    total.backward()
    assert torch.isfinite(logits.grad).all()


def test_lovasz_per_image_skips_unlabelled_image():
    logits = torch.randn(B, C, H, W)
    target = _target(4)
    target[1] = IGNORE_INDEX
    per_image = _value(_loss("lovasz", per_image=True), logits, target)
    first_only = _value(_loss("lovasz"), logits[:1], target[:1])
    torch.testing.assert_close(per_image, first_only)


def test_cross_entropy_matches_torch_over_labelled_pixels():
    logits, target = torch.randn(B, C, H, W), _target(5)
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(cross_entropy(logits, target), expected)


# ----------------------------------------------------------------------------- OHEM
def test_ohem_keeps_exactly_the_planted_hard_pixels():
    target = _target(6, ignore_frac=0.0)
    hard = torch.zeros(B, H, W, dtype=torch.bool)
    hard[0, 1, 2] = hard[0, 4, 4] = hard[1, 0, 0] = hard[1, 3, 5] = hard[1, 5, 1] = True
    logits = _onehot_logits(target, scale=5.0)  # true-class prob ~0.98
    logits[hard.unsqueeze(1).expand_as(logits)] = 0.0
    wrong = (target + 1) % C  # hard pixels: true-class prob ~0.02
    logits.scatter_(1, wrong.unsqueeze(1), torch.where(hard, 5.0, 0.0).unsqueeze(1))
    target[0, 0, 0] = IGNORE_INDEX  # an ignored pixel with a low true-class prob
    logits[0, :, 0, 0] = torch.tensor([-5.0, 5.0, 5.0, 5.0])
    keep = ohem_mask(logits, target, thresh=0.7, min_kept=1)  # batch_kept 2 < 5 planted
    assert torch.equal(keep, hard)


@pytest.mark.parametrize("min_kept", [1, 3, 10])
def test_ohem_low_thresh_keeps_the_batch_kept_lowest(min_kept):
    logits, target = torch.randn(B, C, H, W), _target(7)
    keep = ohem_mask(logits, target, thresh=0.0, min_kept=min_kept)
    assert keep.sum() == min_kept * B
    prob = logits.softmax(1).gather(1, target.clamp(max=C - 1).unsqueeze(1)).squeeze(1)
    valid = target != IGNORE_INDEX
    assert prob[keep].max() < prob[valid & ~keep].min()


def test_ohem_keeps_all_but_the_easiest_when_batch_kept_exceeds_labelled():
    logits, target = torch.randn(B, C, H, W), _target(8)
    keep = ohem_mask(logits, target, thresh=0.0, min_kept=H * W)  # MMSeg: n_valid - 1
    assert keep.sum() == (target != IGNORE_INDEX).sum() - 1


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thresh", [0.0, 0.3, 0.7, 0.95])
@pytest.mark.parametrize("min_kept", [0, 1, 7, 100])
def test_ohem_matches_reference_rule(seed, thresh, min_kept):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(B, C, H, W, generator=g)
    target = _target(seed, ignore_frac=0.25)
    if seed == 3:
        target[0] = IGNORE_INDEX
    expected = reference_ohem(logits, target, thresh=thresh, min_kept=min_kept)
    assert torch.equal(ohem_mask(logits, target, thresh=thresh, min_kept=min_kept), expected)


def test_ohem_loss_averages_ce_over_kept_pixels():
    logits = torch.randn(B, C, H, W, requires_grad=True)
    target = _target(9)
    keep = reference_ohem(logits.detach(), target, thresh=0.5, min_kept=4)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(ohem_cross_entropy(logits, target, thresh=0.5, min_kept=4),
                               ce[keep].mean())


def test_scaled_min_kept():
    assert scaled_min_kept(200000, crop_hw=(320, 320)) == 50000
    assert scaled_min_kept(200000, crop_hw=(640, 640)) == 200000
    assert scaled_min_kept(100, crop_hw=(20, 10), ref_hw=(10, 10)) == 200
    with pytest.raises(PipelineError):
        scaled_min_kept(100, crop_hw=(0, 10))


# ----------------------------------------------------------------------------- distillation
def test_distillation_zero_for_equal_logits_and_positive_otherwise():
    teacher = torch.randn(B, C, H, W)
    assert distillation_loss(teacher.clone(), teacher, temperature=2.0).abs() < 1e-6
    assert distillation_loss(teacher + torch.randn(B, C, H, W), teacher, temperature=2.0) > 0


def test_distillation_grows_with_the_gap():
    g = torch.Generator().manual_seed(10)
    teacher, direction = torch.randn(1, C, 3, 3, generator=g), torch.randn(1, C, 3, 3, generator=g)
    values = [distillation_loss(teacher + d * direction, teacher, temperature=1.5).item()
              for d in (0.25, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_hand_computed_one_pixel(temperature):
    student = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)
    teacher = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)
    e = math.exp(2.0 / temperature)
    p_t = [e / (e + 1), 1 / (e + 1)]  # softmax(teacher / T); softmax(student / T) = [1/2, 1/2]
    kl = sum(p * math.log(p / 0.5) for p in p_t)
    got = distillation_loss(student, teacher, temperature=temperature).item()
    assert got == pytest.approx(temperature ** 2 * kl, rel=1e-5)


def test_distillation_with_target_averages_labelled_pixels_only():
    student, teacher, target = torch.randn(B, C, H, W), torch.randn(B, C, H, W), _target(11)
    kl = F.kl_div(student.log_softmax(1), teacher.log_softmax(1), reduction="none",
                  log_target=True).sum(1)
    got = distillation_loss(student, teacher, temperature=1.0, target=target)
    torch.testing.assert_close(got, kl[target != IGNORE_INDEX].mean())


# ----------------------------------------------------------------------------- build_loss
def test_build_loss_total_is_weighted_sum_of_parts():
    specs = [{"name": "ohem", "weight": 1.0, "thresh": 0.7, "min_kept": 5},
             {"name": "dice", "weight": 0.5}, {"name": "ce", "weight": 0.25},
             {"name": "distill", "weight": 2.0, "temperature": 2.0}]
    loss = build_loss(specs)
    assert loss.needs_teacher
    logits, target, teacher = torch.randn(B, C, H, W), _target(12), torch.randn(B, C, H, W)
    total, parts = loss(logits, target, teacher_logits=teacher)
    assert list(parts) == ["ohem", "dice", "ce", "distill"]
    expected = sum(s["weight"] * parts[s["name"]] for s in specs)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["ce"], cross_entropy(logits, target))
    with pytest.raises(ValueError, match="distill"):
        loss(logits, target)


def test_build_loss_accepts_name_dict_and_repeated_names():
    logits, target = torch.randn(B, C, H, W), _target(13)
    by_name, by_dict = build_loss("ce"), build_loss({"name": "ce"})
    assert not by_name.needs_teacher
    torch.testing.assert_close(by_name(logits, target)[0], by_dict(logits, target)[0])
    total, parts = build_loss(["ce", {"name": "ce", "weight": 3.0}])(logits, target)
    assert list(parts) == ["ce", "ce_2"]
    torch.testing.assert_close(total, 4 * parts["ce"])


def test_build_loss_scales_ohem_min_kept_with_crop():
    loss = build_loss({"name": "ohem", "min_kept": 200000}, crop_hw=(320, 320))
    assert loss.parts["ohem"].min_kept == 50000
    own = build_loss({"name": "ohem", "min_kept": 200000, "crop_hw": [640, 640]}, crop_hw=(320, 320))
    assert own.parts["ohem"].min_kept == 200000
    assert build_loss({"name": "ohem", "min_kept": 7}).parts["ohem"].min_kept == 7


def test_build_loss_typo_lists_valid_names():
    with pytest.raises(PipelineError) as err:
        build_loss([{"name": "ce"}, {"name": "dise", "weight": 0.5}], where="params.yaml: train.loss")
    message = str(err.value)
    assert "params.yaml: train.loss[1]" in message and "'dise'" in message
    for name in list_losses():
        assert name in message


def test_build_loss_unknown_option_lists_valid_options():
    with pytest.raises(PipelineError) as err:
        build_loss({"name": "ohem", "thres": 0.7})
    message = str(err.value)
    assert "'thres'" in message
    for option in loss_options("ohem"):
        assert option in message


@pytest.mark.parametrize("spec", [[], {"weight": 1.0}, {"name": "ce", "weight": "x"},
                                  {"name": "ohem", "thresh": 1.5},
                                  {"name": "distill", "temperature": 0.0}])
def test_build_loss_bad_specs_raise_pipeline_error(spec):
    with pytest.raises(PipelineError):
        build_loss(spec)


# ----------------------------------------------------------------------------- logit adjustment
def test_log_prior_and_bias():
    counts = torch.tensor([10, 30, 60, 0])
    prior = log_prior(counts)
    assert prior.shape == (4,) and torch.isfinite(prior).all()
    torch.testing.assert_close(prior[:3].exp(), torch.tensor([0.1, 0.3, 0.6]))
    assert prior[3] < prior[0]
    per_frame = [[5, 10, 30, 0], [5, 20, 30, 0]]  # [frames, C] is summed over frames
    torch.testing.assert_close(log_prior(per_frame), prior)
    torch.testing.assert_close(logit_adjustment_bias(counts, tau=0.5), 0.5 * prior)
    torch.testing.assert_close(logit_adjustment_bias(counts), 0.03 * prior)


@pytest.mark.parametrize("counts", [[0, 0, 0], [1, -1, 3], []])
def test_log_prior_rejects_bad_counts(counts):
    with pytest.raises(PipelineError):
        log_prior(counts)


def test_student_logits_go_to_the_teacher_parts_only():
    """The engine hands distillation the student's logits without the logit-adjustment prior,
    and every other part the logits with it."""
    loss = build_loss([{"name": "ce"},
                       {"name": "distill", "temperature": 2.0, "labelled_only": False}])
    logits, target, teacher = torch.randn(B, C, H, W), _target(13), torch.randn(B, C, H, W)
    bias = torch.tensor([0.0, -1.0, -2.0, -3.0]).view(1, C, 1, 1)
    _, parts = loss(logits + bias, target, teacher_logits=teacher, student_logits=logits)
    torch.testing.assert_close(parts["ce"], cross_entropy(logits + bias, target))
    torch.testing.assert_close(parts["distill"],
                               distillation_loss(logits, teacher, temperature=2.0))
    _, same = loss(logits + bias, target, teacher_logits=logits, student_logits=logits)
    assert same["distill"].item() == 0.0
