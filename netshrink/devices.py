"""Which device a trial fine-tunes on.

The request decides, not the hardware alone: Ray (2.60) no longer hides the GPUs
from a worker that reserved none (``CUDA_VISIBLE_DEVICES`` is left as it is when
``num_gpus`` is 0), so a trial that asked for no GPU must stay on the CPU even
when it can see one, or unscheduled trials would crowd a card Ray lent to others.
A trial that asked for a GPU (a fraction included: 0.25 lets four trials share a
card) finds only its card visible, as ``cuda``.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def trial_device(requested_gpus: float) -> torch.device:
    """``cuda`` when the trial reserved GPUs and CUDA sees one, else ``cpu`` (logged as a warning if GPUs were asked for)."""
    if requested_gpus <= 0:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    cause = "a CPU-only build of torch" if torch.version.cuda is None else "no NVIDIA driver or no GPU visible to this process"
    message = (
        f"resources.gpu is {requested_gpus:g} but CUDA is not available here (torch {torch.__version__}: {cause}); "
        "fine-tuning on the CPU. GPU nodes need a CUDA build of torch (docs/cluster.md)."
    )
    logger.warning(message)  # logging, not warnings: Ray's launcher runs nodes with PYTHONWARNINGS=ignore
    return torch.device("cpu")
