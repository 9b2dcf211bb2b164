"""The loss a run trains with and the logits each step gives it, a distillation teacher's included.

Without a teacher this is ``models.<name>.loss`` on the student's logits. With one, the
``distill`` part compares student and teacher on bare logits (see
:func:`student_teacher_logits` for why without the logit-adjustment prior).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.runs import RunConfig
from pipeline.data.manifest import ClassInfo
from pipeline.models.prior import add_prior, without_prior
from pipeline.training.losses import build_loss


def build_run_loss(cfg: RunConfig, *, classes: ClassInfo, distill: bool = False):
    """The run's :class:`pipeline.training.losses.CombinedLoss`: ``models.<name>.loss`` plus, for a
    student, the ``distill`` part with its ``weight``, ``temperature`` and ``labelled_only``."""
    specs = list(cfg.model.loss)
    if distill:
        d = cfg.distill
        specs.append({"name": "distill", "weight": d.weight, "temperature": d.temperature,
                      "labelled_only": d.labelled_only})
    return build_loss(specs, ignore_index=classes.ignore_index, crop_hw=cfg.model.augment.get("crop"),
                      where=f"models.{cfg.name}.loss")


def student_teacher_logits(net: nn.Module, teacher: nn.Module | None, images: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(logits, student_bare, teacher_logits)`` of ``images`` [N, 3, H, W]: the logits every
    training loss sees ([N, C, H, W], with the logit-adjustment prior in train mode) and, with a
    teacher, the pair distillation compares (else None, None).

    Distillation compares bare logits ``f(x)`` on both sides, without any prior bias. The
    teacher, in eval mode, drops its prior; the student in train mode adds ``tau*log(prior)``,
    so a KL on its plain output pulls ``f_student`` toward ``f_teacher - tau*log(prior)`` and
    the student ends up adjusted twice at test time. Bare rather than both with the prior
    because ``f`` is what is used at test time, and because the KL then weights classes by the
    balanced posteriors: with the prior on both sides the head classes' mass dominates the soft
    targets, undoing the balance logit adjustment trains for. The student's bare logits come
    from its one forward pass (the prior is added back for the other losses), so identical
    weights give a KL of exactly 0.
    """
    if teacher is None:
        return net(images), None, None
    with without_prior(net):
        bare = net(images)
    with torch.no_grad(), without_prior(teacher):
        teacher_logits = teacher(images)
    return add_prior(net, bare), bare, teacher_logits
