"""Plain PyTorch training and evaluation loops, shared by the baseline, fine-tuning and refinement.

Batches are read through the task's ``BatchFormat`` (any usual structure), the model's
output through ``logits_of``; the optimiser, schedule, clipping and precision come from
the experiment's ``Optimisation`` settings.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from netshrink.config import Optimisation
from netshrink.metrics import Metric, builtin_metric
from netshrink.node_lock import compute_slot
from netshrink.tasks.batches import BatchFormat, targets_tensor
from netshrink.techniques.base import LossFn, cross_entropy
from netshrink.techniques.inputs import batch_size as samples_in, forward_logits, logits_of, call, to_device

# Called at a checkpoint of training with the model and the epochs done so far (0.25 = a quarter of the first
# epoch); returns True to end training there. The model is in eval mode during the call and trains on afterwards.
Checkpoint = Callable[[nn.Module, float], bool]
# Called after each epoch with (epochs done, epochs in all, mean loss of the epoch, seconds since the start).
EpochReport = Callable[[int, int, float, float], None]
StepReport = Callable[[int, int, int, int, float], None]  # (epoch, epochs, step, steps, seconds so far)

DEFAULT_FORMAT = BatchFormat()


@contextmanager
def on_device(model: nn.Module, device: str | torch.device) -> Iterator[nn.Module]:
    """Run ``model`` on ``device`` for the block, then put it back where it was.

    Callers (a technique between two pruning steps, the code that saves the
    artifact) keep working on the CPU with CPU example inputs; only the loop inside
    runs on the GPU.
    """
    home = next(model.parameters(), torch.empty(0)).device
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def make_optimizer(parameters: list[torch.nn.Parameter], settings: Optimisation, lr: float) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=settings.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate's share of ``lr`` at ``step`` (0-based): linear warm-up, then constant or cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))
    return 1.0


def autocast_for(precision: str, device: torch.device):
    """Mixed precision on CUDA; fp32 everywhere else (``ValueError`` naming the rule when another is asked for on the CPU)."""
    if precision == "fp32":
        return nullcontext()
    if device.type != "cuda":
        raise ValueError(f"precision: {precision} needs CUDA (autocast on a GPU); this run trains on the {device.type}, where netshrink trains in fp32 only")
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    loss_fn: LossFn = cross_entropy,
    device: str | torch.device = "cpu",
    checkpoint: Checkpoint | None = None,
    checkpoints_at: Callable[[int], list[float]] | None = None,
    batches: BatchFormat = DEFAULT_FORMAT,
    settings: Optimisation = Optimisation(),  # ``task.train`` or ``finetune`` (both are ``Optimisation`` settings)
    on_epoch: EpochReport | None = None,
    on_step: StepReport | None = None,
) -> list[float]:
    """``settings.optimizer`` on ``dataset`` for ``epochs`` on ``device``; returns the mean loss of each epoch (of those run).

    Shuffling is drawn from a generator seeded with ``seed`` so a rerun gives the same model.
    The model ends where it started (see ``on_device``). ``checkpoint`` is called after each
    epoch, and within epochs at the epoch fractions ``checkpoints_at(epoch)`` gives (default
    none); when it returns True, training ends there. Checkpoints do not change the model:
    with or without them, the same seed trains the same weights. ``on_epoch`` hears of each
    epoch's end, ``on_step`` of each optimizer step (progress lines within long epochs).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = batches.loader(dataset, batch_size, shuffle=True, generator=generator)
    device = torch.device(device)
    history: list[float] = []
    started = time.perf_counter()
    with on_device(model, device):
        model.train()
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], settings, lr)
        steps = len(loader)
        total_steps, warmup_steps = epochs * steps, round(settings.warmup_epochs * steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, settings.schedule)
        )
        scaler = torch.amp.GradScaler("cuda") if settings.precision == "fp16" and device.type == "cuda" else None
        autocast_for(settings.precision, device)  # the rule checked before the first step
        step_settings = _Step(optimizer, scheduler, scaler, settings.grad_clip, settings.precision, loss_fn, device, batches)
        for epoch in range(epochs):
            within = sorted(f for f in (checkpoints_at(epoch) if checkpoints_at else []) if 0 < f < 1)
            stops = {max(1, round(f * steps)): f for f in within}

            def at_step(step: int, epoch: int = epoch) -> bool:
                if on_step is not None:
                    on_step(epoch + 1, epochs, step, steps, time.perf_counter() - started)
                if checkpoint is None or (step not in stops and step != steps):
                    return False
                done = epoch + (1.0 if step == steps else stops[step])
                rng = torch.random.get_rng_state()  # an evaluation's data loader draws from the global generator
                model.eval()
                try:
                    return checkpoint(model, done)
                finally:
                    model.train()
                    torch.random.set_rng_state(rng)

            loss, stopped = _epoch(model, loader, step_settings, at_step)
            history.append(loss)
            if on_epoch is not None:
                on_epoch(epoch + 1, epochs, loss, time.perf_counter() - started)
            if stopped:
                break
    model.eval()
    return history


@dataclass
class _Step:
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    grad_clip: float | None
    precision: str
    loss_fn: LossFn
    device: torch.device
    batches: BatchFormat


def _epoch(model: nn.Module, loader, step: _Step, after_step: Callable[[int], bool]) -> tuple[float, bool]:
    """One pass over ``loader``; returns the mean loss per sample, and whether ``after_step`` asked to stop."""
    total, count = 0.0, 0
    for index, batch in enumerate(loader, start=1):
        inputs, targets = step.batches.split(batch)
        inputs, targets = to_device(inputs, step.device), _to(targets, step.device)
        with compute_slot():  # lets a latency measurement elsewhere on the machine run undisturbed
            with autocast_for(step.precision, step.device):
                loss = step.loss_fn(logits_of(call(model, inputs)), targets, inputs)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}")
            step.optimizer.zero_grad(set_to_none=True)
            if step.scaler is not None:
                step.scaler.scale(loss).backward()
                step.scaler.unscale_(step.optimizer)
            else:
                loss.backward()
            if step.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for group in step.optimizer.param_groups for p in group["params"]], step.grad_clip)
            if step.scaler is not None:
                step.scaler.step(step.optimizer)
                step.scaler.update()
            else:
                step.optimizer.step()
            step.scheduler.step()
        size = samples_in(inputs)
        total += loss.item() * size
        count += size
        if after_step(index):
            return total / max(count, 1), True
    return total / max(count, 1), False


def _to(targets: Any, device: torch.device) -> Any:
    return targets.to(device) if isinstance(targets, torch.Tensor) else targets


@dataclass(frozen=True)
class Predictions:
    """A split's logits and targets, in order: what a metric and its interval are computed from."""

    logits: torch.Tensor
    targets: Any

    def __len__(self) -> int:
        return len(self.logits)


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str | torch.device = "cpu", batches: BatchFormat = DEFAULT_FORMAT
) -> Predictions:
    """The model's logits on every sample of ``dataset`` (on ``device``; the model ends where it started)."""
    model.eval()
    logits, targets = [], []
    with on_device(model, device):
        for inputs, target in batches.batches(dataset, batch_size):
            with compute_slot():
                output = forward_logits(model, to_device(inputs, device))
            logits.append(output.float().cpu())
            targets.append(target)
    return Predictions(logits=torch.cat(logits), targets=targets_tensor(targets))


def evaluate(
    model: nn.Module, dataset: Dataset, *, metric: Metric | None = None, batches: BatchFormat = DEFAULT_FORMAT,
    device: str | torch.device = "cpu", batch_size: int = 256,
) -> float:
    """The task's metric (top-1 accuracy by default) of ``model`` on ``dataset``."""
    predictions = predict(model, dataset, batch_size=batch_size, device=device, batches=batches)
    return (metric or builtin_metric("accuracy"))(predictions.logits, predictions.targets)


def accuracy(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy in [0, 1] of a model of one tensor input on ``(inputs, label)`` items."""
    return evaluate(model, dataset, batch_size=batch_size, device=device)
