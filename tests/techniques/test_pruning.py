import pytest
import torch
from safetensors.torch import load_file

from netshrink.tasks.models import LeNet5
from netshrink.techniques import Pipeline, PruningConfig, compress, save_artifact
from netshrink.techniques.pruning import magnitude_mask
from tests.models import ResidualBN


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_channel_pruning_physically_removes_channels_and_keeps_the_classes():
    model = LeNet5()
    x = torch.zeros(1, 1, 28, 28)
    pruned = compress(model, Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5)]), x).model
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels, pruned.fc1.out_features) == (10, 25, 250)
    assert pruned.fc2.out_features == 10
    assert count(pruned) < count(model) / 3
    assert pruned(torch.randn(4, 1, 28, 28)).shape == (4, 10)


def test_channel_pruning_keeps_residual_and_batchnorm_consistent():
    model = ResidualBN().eval()
    pruned = compress(model, Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5)]), torch.zeros(1, 1, 12, 12)).model
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in pruned.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(conv.out_channels == 8 for conv in convs)
    assert all(norm.num_features == norm.running_mean.numel() == 8 for norm in norms)
    assert pruned(torch.randn(2, 1, 12, 12)).shape == (2, 10)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_weight_pruning_reaches_the_ratio_in_every_layer_and_stays_after_training(ratio):
    model = LeNet5()

    def fine_tune(m, loss_fn=None):
        optimizer = torch.optim.Adam(m.parameters(), lr=0.01)
        for _ in range(3):
            loss = m(torch.randn(8, 1, 28, 28)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    pruned = compress(model, Pipeline(steps=[PruningConfig(granularity="weight", ratio=ratio)]), torch.zeros(1, 1, 28, 28), fine_tune=fine_tune).model
    for layer in (pruned.conv1, pruned.conv2, pruned.fc1, pruned.fc2):
        zeros = (layer.weight == 0).float().mean().item()
        assert zeros == pytest.approx(ratio, abs=0.01)
    assert count(pruned) == count(model)  # unstructured: same dense shapes, only zeros


def test_unstructured_pruning_saves_bytes_only_through_sparse_storage(tmp_path):
    model = LeNet5()
    x = torch.zeros(1, 1, 28, 28)
    dense = compress(model, Pipeline(), x)
    sparse = compress(model, Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.75)]), x)
    dense_bytes = save_artifact(tmp_path / "d.safetensors", dense.model, dense.encodings, "{}")
    sparse_bytes = save_artifact(tmp_path / "s.safetensors", sparse.model, sparse.encodings, "{}")
    stored = load_file(tmp_path / "s.safetensors")
    assert stored["fc1.weight.values"].numel() == 100_000  # a quarter of 400,000 weights kept
    assert stored["fc1.weight.mask"].numel() == 400_000 // 8
    assert sparse_bytes < 0.4 * dense_bytes


def test_magnitude_mask_drops_the_smallest():
    weight = torch.tensor([[0.1, -3.0], [2.0, -0.05]])
    assert magnitude_mask(weight, 0.5).tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_ratio_must_be_strictly_between_zero_and_one():
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            PruningConfig(ratio=bad)
