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

from .base import CompressionContext, LossFn, Stage, Technique, TechniqueConfig


class DistillationConfig(TechniqueConfig):
    kind: Literal["distillation"] = "distillation"
    temperature: float = Field(4.0, gt=0.0, le=1000.0, description="softmax temperature T of the soft targets")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the soft-target loss; 1 - alpha goes to the hard labels")


def soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T): the soft targets."""
    return F.softmax(logits / temperature, dim=-1)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1), soften(teacher_logits, temperature), reduction="batchmean"
    )
    return alpha * temperature**2 * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def teacher_loss(teacher: nn.Module, temperature: float, alpha: float) -> LossFn:
    """A training loss (logits, labels, inputs) -> loss that asks ``teacher`` for soft targets."""

    def loss(student_logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        teacher.to(inputs.device)
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        return distillation_loss(student_logits, teacher_logits, labels, temperature, alpha)

    return loss


class Distillation(Technique):
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
        ctx.loss_fn = teacher_loss(teacher, config.temperature, config.alpha)
