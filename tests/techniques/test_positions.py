"""Where a sparse tensor's nonzeros are: the writer's choice of dense, bitmask or Rice-coded runs of zeros."""

import math

import numpy as np
import pytest
import torch

from netshrink.tasks.models import LeNet5
from netshrink.techniques import Pipeline, PruningConfig, compress
from netshrink.techniques.encoding import (
    TensorEncoding, decode_tensor, encode_tensor, plan_layout, rice_bytes, rice_decode, rice_encode, run_lengths,
)


def entropy_bits(density: float) -> float:
    return -(density * math.log2(density) + (1 - density) * math.log2(1 - density))


@pytest.mark.parametrize("density", [0.0, 0.001, 0.08, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_rice_coded_runs_decode_to_the_same_positions(density, k):
    mask = np.random.default_rng(0).random(5_003) < density
    runs = run_lengths(mask)
    unary, low = rice_encode(runs, k)
    assert unary.numel() + (low.numel() if low is not None else 0) == rice_bytes(runs, k)
    decoded = rice_decode(unary, low, k, runs.size)
    assert np.array_equal(decoded, runs)
    assert np.array_equal(np.cumsum(decoded + 1) - 1, np.flatnonzero(mask))


def test_at_eight_percent_density_positions_cost_at_most_half_a_bit_per_weight():
    # a layer of fc1's size with 8% kept at random: the entropy limit is 0.402 bit per weight
    weight = torch.randn(500, 800, generator=torch.Generator().manual_seed(0))
    weight = weight * (torch.rand(500, 800, generator=torch.Generator().manual_seed(1)) < 0.08)
    layout = plan_layout(weight, TensorEncoding(sparse=True))
    assert layout.positions == "gaps"
    per_weight = 8 * layout.position_bytes / weight.numel()
    density = float((weight != 0).float().mean())
    assert abs(density - 0.08) < 0.002
    assert entropy_bits(density) - 0.001 < per_weight <= 0.5, per_weight  # Rice: within a few thousandths of the entropy


def test_magnitude_pruned_lenet_fc1_at_eight_percent_keeps_positions_under_half_a_bit():
    pruned = compress(LeNet5(), Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.92)]), torch.zeros(1, 1, 28, 28))
    weight = pruned.model.fc1.weight.detach()
    layout = plan_layout(weight, pruned.encodings["fc1.weight"])
    assert layout.positions == "gaps" and layout.nonzeros == 32_000
    assert 8 * layout.position_bytes / weight.numel() <= 0.5


@pytest.mark.parametrize(
    "encoding, zeros, expected",
    [
        (TensorEncoding(bits=4, sparse=True), 0.10, "dense"),  # 1 bit of mask costs more than 10% of 4-bit codes saves
        (TensorEncoding(bits=32, sparse=True), 0.10, "bitmask"),  # but less than 10% of float32 values
        (TensorEncoding(bits=8, sparse=True), 0.92, "gaps"),
        (TensorEncoding(bits=8, sparse=False), 0.92, "dense"),  # a plan without pruning is stored dense
    ],
)
def test_the_smallest_valid_layout_is_chosen_and_decodes_exactly(encoding, zeros, expected):
    generator = torch.Generator().manual_seed(2)
    magnitudes = 1 + torch.rand(64, 300, generator=generator)  # no weight near zero: only the pruned ones code to 0
    weight = torch.where(torch.rand(64, 300, generator=generator) < 0.5, -magnitudes, magnitudes) * (torch.rand(64, 300, generator=generator) >= zeros)
    layout = plan_layout(weight, encoding)
    assert layout.positions == expected
    stored = encode_tensor("w", weight, encoding, layout)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == layout.payload_bytes
    for other in ("dense", "bitmask", "gaps"):  # every other valid layout would have been larger
        if other != expected and (other == "dense" or encoding.sparse):
            forced = layout.model_copy(update={"positions": other})
            written = sum(t.numel() * t.element_size() for t in encode_tensor("w", weight, encoding, forced).values())
            assert written >= layout.payload_bytes
    reference = encode_tensor("w", weight, encoding, layout.model_copy(update={"positions": "dense"}))
    dense = decode_tensor("w", reference, (64, 300), encoding)
    assert torch.equal(decode_tensor("w", stored, (64, 300), encoding, layout), dense)


def test_a_pruned_binary_layer_is_ternary_and_cannot_be_stored_dense():
    weight = torch.randn(32, 100, generator=torch.Generator().manual_seed(3))
    weight = weight * (weight.abs() > 0.3)  # 24% zeros
    layout = plan_layout(weight, TensorEncoding(bits=1, sparse=True))
    assert layout.value_format == "ternary" and layout.positions != "dense"  # a binary code has no zero
    assert plan_layout(weight, TensorEncoding(bits=2)).value_format == "ternary"
    assert plan_layout(torch.randn(8, 8), TensorEncoding(bits=1)).value_format == "binary"


@pytest.mark.parametrize("bits", [32, 8, 2])
def test_empty_rows_are_skipped_by_a_row_bitmask_when_that_is_smaller_and_decode_exactly(bits):
    """Dead neurons (rows with no weight left) cost one bit each instead of their runs of zeros."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(500, 800, generator=generator) * (torch.rand(500, 800, generator=generator) < 0.10)
    weight[::5] = 0  # every fifth neuron is dead
    encoding = TensorEncoding(bits=bits, sparse=True)
    layout = plan_layout(weight, encoding)
    assert layout.positions == "gaps" and layout.rows
    without = layout.model_copy(update={"rows": False})
    stored = encode_tensor("w", weight, encoding, layout)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == layout.payload_bytes
    assert sum(t.numel() * t.element_size() for t in encode_tensor("w", weight, encoding, without).values()) > layout.payload_bytes
    for used in (layout, without):
        decoded = decode_tensor("w", encode_tensor("w", weight, encoding, used), tuple(weight.shape), encoding, used)
        reference = decode_tensor("w", encode_tensor("w", weight, encoding, layout.model_copy(update={"positions": "dense", "rows": False})), tuple(weight.shape), encoding)
        assert torch.equal(decoded, reference)
