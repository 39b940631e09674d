"""Measurements of a compressed model: accuracy, artifact size, ONNX Runtime latency.

Latency is measured, never estimated: wall time of batch-1 inference on ONNX
Runtime's CPU provider with a fixed thread count, after warm-up. A trial times
its model in alternation with the baseline model, so that the machine's speed
drift cancels out of the ratio (see ``measure_relative_latency``). While a
measurement runs, the machine is quiet: no other measurement, and no training
or evaluation step of any other trial (``netshrink.node_lock``), so trials that
run concurrently do not disturb each other's figures.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from netshrink.config import MeasureSettings
from netshrink.metrics import Metric, builtin_metric
from netshrink.node_lock import compute_slot, quiet_machine
from netshrink.tasks.batches import BatchFormat, targets_tensor
from netshrink.techniques.inputs import numpy_feed

from .onnx_export import EXIT_OUTPUT, deployment_config


def ort_session(onnx_path: str | os.PathLike, threads: int = 1, config: dict[str, str] | None = None):
    """An ONNX Runtime CPU session with a fixed thread count, in the session options the model is deployed with.

    ``config``: session config entries; default: the ones the exported file records as its deployment's
    (``onnx_export.deployment_config``). A weight-only integer model records ``session.disable_quant_qdq=1``:
    its int8 weights are dequantized once at load time rather than on every call.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in (deployment_config(onnx_path) if config is None else config).items():
        options.add_session_config_entry(key, value)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(onnx_path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Latency:
    """Batch-1 latency figures in milliseconds."""

    ms: float  # median of the quietest block of consecutive runs
    median_all_ms: float  # median over all runs
    p90_ms: float
    runs: int


@dataclass(frozen=True)
class RelativeLatency:
    """A model timed in alternation with a reference model, under the same machine conditions."""

    ratio: float  # candidate / reference: median over rounds of the per-round ratio of block medians
    candidate: Latency
    reference: Latency


# The machine's speed drifts: on these 2-vCPU VMs the same session measured 0.10-0.11 ms for
# minutes, then 0.13-0.16 ms for minutes (20 s traces and repeated runs, host-level, not tied to a
# CPU or an ONNX Runtime session). Absolute figures taken minutes apart cannot agree within 10%;
# a ratio to a reference timed in alternation can, because both see the same conditions.
BLOCKS = 10
# Rounds of the alternating measurement: with 2000 runs, 40 rounds of 50 gave a same-model ratio
# with a standard deviation of 1.0% (10 rounds: 1.3%) over 25 repetitions.
ROUNDS = 40


# A model with early exits takes input-dependent time: it is timed over the whole validation set
# per block (the mean is what a user sees), in fewer rounds since each block is a full pass.
DYNAMIC_ROUNDS = 10

Feeds = list[dict[str, np.ndarray]]  # ONNX Runtime feeds, one call each (``BatchFormat.feeds``): real samples


def has_exits(session) -> bool:
    return any(output.name == EXIT_OUTPUT for output in session.get_outputs())


def _block(session, feeds: Feeds, runs: int) -> list[float]:
    """``runs`` calls, cycling through ``feeds``; the wall time of each."""
    timings = []
    for run in range(runs):
        feed = feeds[run % len(feeds)]
        start = time.perf_counter()
        session.run(None, feed)
        timings.append(time.perf_counter() - start)
    return timings


def _summary(blocks: list[list[float]], statistic=statistics.median) -> Latency:
    timings = [t for block in blocks for t in block]
    return Latency(
        ms=min(statistic(block) for block in blocks) * 1000.0,
        median_all_ms=statistics.median(timings) * 1000.0,
        p90_ms=float(np.percentile(timings, 90)) * 1000.0,
        runs=len(timings),
    )


def measure_latency(onnx_path: str | os.PathLike, feeds: Feeds, settings: MeasureSettings = MeasureSettings(), batch: int = 1) -> Latency:
    """Time ``settings.repeats`` runs in 10 blocks on the first feed, after warm-up, while the machine is quiet.

    ``batch``: samples per call of ``feeds`` (the runs are ``repeats / batch`` calls). ``ms`` is the
    median of the block with the lowest median: short bursts of noise spoil some blocks, rarely all.
    """
    session = ort_session(onnx_path, settings.threads)
    feeds = feeds[:1]
    per_block = max(1, settings.repeats // (BLOCKS * batch) + (batch > 1))
    with quiet_machine():
        _block(session, feeds, max(settings.warmup // batch, 1))
        blocks = [_block(session, feeds, per_block) for _ in range(BLOCKS)]
    return _summary(blocks)


def throughput(latency_ms: float, batch: int) -> float:
    """Samples per second of calls of ``batch`` samples that each take ``latency_ms``."""
    return batch / (latency_ms / 1000.0)


def measure_relative_latency(
    onnx_path: str | os.PathLike,
    reference_path: str | os.PathLike,
    feeds: Feeds,
    settings: MeasureSettings = MeasureSettings(),
    config: dict[str, str] | None = None,
    batch: int = 1,
) -> RelativeLatency:
    """Time the model and a reference in alternating rounds of two blocks each; the ratio is the median per-round ratio.

    Each round's ratio compares two blocks taken back to back, under the same
    conditions, in alternating order. A static model runs 40 rounds of
    ``repeats / 40`` calls on the first feed (its time does not depend on the
    input), compared by block medians. A model with early exits runs 10 rounds
    of one pass over all ``feeds`` each (the validation set), compared by block
    means: its figure is the mean over the data with the real exit logic.

    Both sessions use the options their files record for deployment, unless ``config`` gives the
    candidate's (the per-call dequantization figure of a weight-only integer model). With ``batch`` > 1
    the feeds hold ``batch`` samples a call (throughput), timed in ``repeats / batch`` calls over 40 rounds.
    """
    candidate = ort_session(onnx_path, settings.threads, config)
    reference = ort_session(reference_path, settings.threads)
    if batch > 1:
        feeds, rounds, per_block, statistic = feeds[:1], ROUNDS, max(1, settings.repeats // (ROUNDS * batch) + 1), statistics.median
    elif has_exits(candidate):
        rounds, per_block, statistic = DYNAMIC_ROUNDS, len(feeds), statistics.fmean
    else:
        feeds, rounds, per_block, statistic = feeds[:1], ROUNDS, max(1, settings.repeats // ROUNDS), statistics.median
    candidate_blocks, reference_blocks = [], []
    with quiet_machine():
        _block(candidate, feeds, max(settings.warmup // batch, 1))
        _block(reference, feeds, max(settings.warmup // batch, 1))
        for round_index in range(rounds):
            # ABBA order: whichever model runs second in a round finds the other's data in cache;
            # alternating the order cancels that (and any linear drift) out of the ratio.
            if round_index % 2 == 0:
                candidate_blocks.append(_block(candidate, feeds, per_block))
                reference_blocks.append(_block(reference, feeds, per_block))
            else:
                reference_blocks.append(_block(reference, feeds, per_block))
                candidate_blocks.append(_block(candidate, feeds, per_block))
    ratios = [statistic(c) / statistic(r) for c, r in zip(candidate_blocks, reference_blocks)]
    return RelativeLatency(
        ratio=statistics.median(ratios),
        candidate=_summary(candidate_blocks, statistic),
        reference=_summary(reference_blocks, statistic),
    )


def measure_latency_ms(onnx_path: str | os.PathLike, feeds: Feeds, settings: MeasureSettings = MeasureSettings()) -> float:
    return measure_latency(onnx_path, feeds, settings).ms


@dataclass(frozen=True)
class OnnxEvaluation:
    value: float  # the task's metric of the ONNX model's answers
    exit_counts: dict[int, int]  # exit index -> samples it answered (early-exit models only; the last index is the full network)


def onnx_evaluate(onnx_path: str | os.PathLike, dataset, batches: BatchFormat | None = None, metric: Metric | None = None) -> OnnxEvaluation:
    """The task's metric (default: top-1 accuracy) of the ONNX model on ``dataset``, one sample per call as a deployed
    model sees them, with ONNX Runtime and numpy alone.

    Checks that the export computes what torch computed; for a model with early
    exits it also counts which exit answered each sample.
    """
    batches = batches or BatchFormat()
    session = ort_session(onnx_path, threads=1)
    exits = has_exits(session)
    counts: dict[int, int] = {}
    logits, targets = [], []
    for index in range(len(dataset)):
        inputs, target = batches.collated(dataset, [index])
        with compute_slot():
            outputs = session.run(None, numpy_feed(inputs))
        logits.append(torch.from_numpy(np.asarray(outputs[0], dtype=np.float32)))
        targets.append(target)
        if exits:
            counts[int(outputs[1])] = counts.get(int(outputs[1]), 0) + 1
    value = (metric or builtin_metric("accuracy"))(torch.cat(logits), targets_tensor(targets))
    return OnnxEvaluation(value=value, exit_counts=counts)
