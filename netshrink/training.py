"""Plain PyTorch training and evaluation loops, shared by the baseline and fine-tuning."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from netshrink.node_lock import compute_slot
from netshrink.techniques.base import LossFn, cross_entropy

# Called at a checkpoint of training with the model and the epochs done so far (0.25 = a quarter of the first
# epoch); returns True to end training there. The model is in eval mode during the call and trains on afterwards.
Checkpoint = Callable[[nn.Module, float], bool]


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
) -> list[float]:
    """Adam on ``dataset`` for ``epochs`` on ``device``; returns the mean loss of each epoch (of those run).

    Shuffling is drawn from a generator seeded with ``seed`` so a rerun gives the same model.
    The model ends where it started (see ``on_device``). ``checkpoint`` is called after each
    epoch, and within epochs at the epoch fractions ``checkpoints_at(epoch)`` gives (default
    none); when it returns True, training ends there. Checkpoints do not change the model:
    with or without them, the same seed trains the same weights.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    history: list[float] = []
    with on_device(model, device):
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        for epoch in range(epochs):
            within = sorted(f for f in (checkpoints_at(epoch) if checkpoints_at else []) if 0 < f < 1)
            steps = len(loader)
            stops = {max(1, round(f * steps)): f for f in within}

            def at_step(step: int, epoch: int = epoch) -> bool:
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

            loss, stopped = _epoch(model, loader, optimizer, loss_fn, device, at_step)
            history.append(loss)
            if stopped:
                break
    model.eval()
    return history


def _epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, loss_fn: LossFn, device: str | torch.device,
    after_step: Callable[[int], bool],
) -> tuple[float, bool]:
    """One pass over ``loader``; returns the mean loss per sample, and whether ``after_step`` asked to stop."""
    total, count = 0.0, 0
    for step, (inputs, labels) in enumerate(loader, start=1):
        inputs, labels = inputs.to(device), labels.to(device)
        with compute_slot():  # lets a latency measurement elsewhere on the machine run undisturbed
            loss = loss_fn(model(inputs), labels, inputs)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        total += loss.item() * len(labels)
        count += len(labels)
        if after_step(step):
            return total / max(count, 1), True
    return total / max(count, 1), False


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy in [0, 1], computed on ``device``; the model ends where it started."""
    model.eval()
    correct, count = 0, 0
    with on_device(model, device):
        for inputs, labels in DataLoader(dataset, batch_size=batch_size):
            with compute_slot():
                predictions = model(inputs.to(device)).argmax(dim=1).cpu()
            correct += int((predictions == labels).sum())
            count += len(labels)
    return correct / max(count, 1)
