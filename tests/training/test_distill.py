"""A run's loss with a distillation teacher (pipeline.training.distill): bare logits on both
sides, void pixels left out unless asked."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.core.runs import parse_model_params
from pipeline.training.distill import build_run_loss, student_teacher_logits

# ----------------------------------------------------------------------------- distillation
GN_LA = {"arch": "Unet", "encoder": "tu-test_efficientnet_gn", "num_classes": 3,
         "decoder_channels": [16, 16, 8, 8, 8], "decoder_use_norm": "identity"}


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_identical_teacher_and_student_distill_to_exactly_zero_with_logit_adjustment(head):
    """The student trains in train mode (prior bias on), the teacher predicts in eval mode (off):
    distillation compares both without it. GroupNorm only, so that train and eval mode differ
    in nothing else."""
    from pipeline.data.manifest import ClassInfo
    from pipeline.models.build import build_model

    # a fixed init: about 1 in 50 random cosine heads leaves the naive KL below 0.01
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = build_model(**GN_LA, logit_adjust={"tau": 1.0, "prior": [8.0, 1.0, 1.0],
                                                     "head": head}).train()
    teacher = copy.deepcopy(student).eval()
    cfg = parse_model_params("kd", {"distill": {"teacher": "t", "temperature": 2.0}})
    loss_fn = build_run_loss(cfg, classes=ClassInfo(names=["a", "b", "c"], palette=[]),
                             distill=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    logits, bare, teacher_logits = student_teacher_logits(student, teacher, images)
    _, parts = loss_fn(logits, target, teacher_logits=teacher_logits, student_logits=bare)
    assert parts["distill"].item() == 0.0
    with torch.no_grad():
        assert torch.equal(logits, student(images))  # the other losses still see the prior
    # comparing the student's plain train-mode output (as before) is not zero
    _, naive = loss_fn(logits, target, teacher_logits=teacher_logits)
    assert naive["distill"].item() > 0.01


@pytest.mark.parametrize("labelled_only", [True, False])
def test_distill_labelled_only_leaves_void_pixels_out(labelled_only):
    from pipeline.data.manifest import ClassInfo

    distill = {"teacher": "t"} if labelled_only else {"teacher": "t", "labelled_only": False}
    cfg = parse_model_params("kd", {"distill": distill})
    assert cfg.distill.labelled_only is labelled_only  # true by default
    loss_fn = build_run_loss(cfg, classes=ClassInfo(names=["a", "b", "c"], palette=[]),
                             distill=True)
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8), generator=gen)
    target[:, :3] = 255  # void (and padding) pixels
    student, teacher = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    moved = torch.where((target == 255).unsqueeze(1), teacher + 5 * torch.randn(2, 3, 8, 8), teacher)
    a = loss_fn(student, target, teacher_logits=teacher)[1]["distill"]
    b = loss_fn(student, target, teacher_logits=moved)[1]["distill"]
    assert torch.equal(a, b) is labelled_only

