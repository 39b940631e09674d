import copy

import pytest
import torch

from netshrink.tasks.models import LeNet5
from netshrink.techniques import DistillationConfig, Pipeline, PruningConfig, compress
from netshrink.techniques.distillation import distillation_loss, soften


def test_softening_matches_the_textbook_case():
    # logits (100, 10, 1) at T = 100 -> softmax(1, 0.1, 0.01) ~ (0.56, 0.23, 0.21)
    soft = soften(torch.tensor([100.0, 10.0, 1.0]), temperature=100.0)
    assert soft.tolist() == pytest.approx([0.562, 0.229, 0.209], abs=0.002)
    hard = soften(torch.tensor([100.0, 10.0, 1.0]), temperature=1.0)
    assert hard[0] > 0.999  # at T = 1 the same logits are almost one-hot


def test_loss_mixes_soft_and_hard_targets():
    generator = torch.Generator().manual_seed(0)  # unseeded, the KL of a distribution with itself sat at 1e-6 of float noise on some draws
    student, teacher, labels = torch.randn(4, 10, generator=generator), torch.randn(4, 10, generator=generator), torch.tensor([1, 2, 3, 4])
    ce = torch.nn.functional.cross_entropy(student, labels)
    hard_only = distillation_loss(student, teacher, ce, temperature=4.0, alpha=0.0)
    assert hard_only == pytest.approx(torch.nn.functional.cross_entropy(student, labels).item())
    assert distillation_loss(teacher, teacher, ce, temperature=4.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_is_alpha_t_squared_kl_plus_the_rest_on_cross_entropy():
    """Hinton et al.'s weighting, written out by hand: dropping the T^2 would shrink the soft term 16-fold at T = 4."""
    student = torch.tensor([[2.0, -1.0, 0.5, 0.0], [-0.5, 1.5, 0.0, 3.0], [1.0, 1.0, -2.0, 0.5]])
    teacher = torch.tensor([[-1.0, 3.0, 0.0, 1.0], [2.5, -1.0, 1.0, 0.0], [0.0, -1.5, 2.0, 1.0]])
    labels = torch.tensor([0, 3, 2])
    temperature, alpha = 4.0, 0.7
    teacher_soft = torch.softmax(teacher / temperature, dim=1)
    student_log_soft = torch.log_softmax(student / temperature, dim=1)
    kl = (teacher_soft * (teacher_soft.log() - student_log_soft)).sum(dim=1).mean().item()  # KL(teacher_T || student_T), batchmean
    ce = -torch.log_softmax(student, dim=1)[torch.arange(3), labels].mean().item()
    expected = alpha * temperature**2 * kl + (1 - alpha) * ce
    assert alpha * kl + (1 - alpha) * ce < 0.5 * expected  # the soft term is large enough that a lost T^2 shows
    assert distillation_loss(student, teacher, torch.nn.functional.cross_entropy(student, labels), temperature, alpha).item() == pytest.approx(expected, rel=1e-5)


def test_the_student_learns_from_the_teacher_and_the_teacher_is_left_alone():
    torch.manual_seed(0)
    teacher = LeNet5().train()
    before = copy.deepcopy(teacher.state_dict())
    seen = {}

    def fine_tune(model, loss_fn):
        seen["loss_fn"] = loss_fn
        x = torch.randn(8, 1, 28, 28)
        loss = loss_fn(model(x), torch.randint(0, 10, (8,)), x)
        loss.backward()

    pipeline = Pipeline(steps=[DistillationConfig(temperature=3.0, alpha=0.7), PruningConfig(ratio=0.5)])
    compress(teacher, pipeline, torch.zeros(1, 1, 28, 28), fine_tune=fine_tune)
    assert seen["loss_fn"] is not None
    assert teacher.training  # the caller's model keeps its mode
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_soft_loss_is_zero_when_the_student_equals_the_teacher():
    torch.manual_seed(1)
    model = LeNet5().eval()
    x = torch.randn(4, 1, 28, 28)
    captured = {}
    compress(model, Pipeline(steps=[DistillationConfig(alpha=1.0)]), x[:1], fine_tune=lambda m, loss_fn: captured.update(loss=loss_fn(m(x), torch.zeros(4, dtype=torch.long), x)))
    assert captured["loss"].item() == pytest.approx(0.0, abs=1e-5)


def test_knob_rules():
    with pytest.raises(ValueError, match="temperature"):
        DistillationConfig(temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        DistillationConfig(alpha=1.5)
