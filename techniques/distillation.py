"""Knowledge distillation: the uncompressed model teaches the compressed one.

Hinton et al. (2015): the teacher's logits, softened by a temperature T
(softmax(logits / T)), carry how similar the classes look to it. The student is
trained on alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels);
the T^2 keeps the soft term's gradients at the scale of the hard term's as T grows.
The teacher is the caller's model as it was before any technique touched it.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import CompressionContext, LossFn, Stage, Technique, TechniqueConfig, cross_entropy
from .inputs import Inputs, forward_logits


class DistillationConfig(TechniqueConfig):
    kind: Literal["distillation"] = "distillation"
    temperature: float = Field(4.0, gt=0.0, le=1000.0, description="softmax temperature T of the soft targets")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the soft-target loss; 1 - alpha goes to the hard labels")


def soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T): the soft targets."""
    return F.softmax(logits / temperature, dim=-1)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, hard_loss: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """Hinton et al.'s loss: ``alpha`` T^2 KL(soft targets || student) + (1 - alpha) x the task's own loss (``hard_loss``)."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1), soften(teacher_logits, temperature), reduction="batchmean"
    )
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard_loss


def teacher_loss(teacher: nn.Module, temperature: float, alpha: float, task_loss: LossFn = cross_entropy) -> LossFn:
    """A training loss (logits, targets, inputs) -> loss that asks ``teacher`` for soft targets; the hard part is ``task_loss``."""

    def loss(student_logits: torch.Tensor, targets, inputs: Inputs) -> torch.Tensor:
        teacher.to(student_logits.device)
        with torch.no_grad():
            teacher_logits = forward_logits(teacher, inputs)
        return distillation_loss(student_logits, teacher_logits, task_loss(student_logits, targets, inputs), temperature, alpha)

    return loss


class Distillation(Technique):
    summary = 'knowledge distillation from the uncompressed model during fine-tuning (compresses nothing by itself)'
    config_type: ClassVar[type[TechniqueConfig]] = DistillationConfig
    stage: ClassVar[Stage] = Stage.DISTILLATION
    # it changes how the model is fine-tuned, not the model: alone it would spend a trial on the baseline
    compresses: ClassVar[bool] = False
    default_space: ClassVar[dict[str, Any]] = {
        "temperature": {"low": 1.0, "high": 20.0, "log": True},
        "alpha": {"low": 0.1, "high": 0.9},
    }

    def apply(self, model: nn.Module, config: DistillationConfig, ctx: CompressionContext) -> None:
        if ctx.teacher is None:
            raise ValueError("distillation needs a teacher: compress() passes the caller's model")
        teacher = copy.deepcopy(ctx.teacher).eval()  # the caller's model keeps its own mode and device
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        ctx.loss_fn = teacher_loss(teacher, config.temperature, config.alpha, ctx.task_loss or cross_entropy)
