from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from netshrink.tasks.models import lenet5
from netshrink.techniques import EarlyExitConfig, EarlyExitNet, LowRankConfig, Pipeline, PruningConfig, compress, exit_points, load_artifact, save_artifact, SeparableConfig
from tests.models import EDGE_MODELS

X = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def early(model=None, **knobs):
    model = model or lenet5()
    return compress(model, Pipeline(steps=[EarlyExitConfig(**knobs)]), X[:1])


def test_cut_points_follow_the_forward_order_and_never_split_a_residual_block():
    assert exit_points(lenet5()) == ["conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "relu"]
    # in ResidualBN the skip tensor is live across block.0 .. block.4: no cut there
    assert exit_points(EDGE_MODELS["residual_bn"]()) == ["stem.0", "stem.1", "stem", "stem.2", "add", "relu", "mean"]


def test_a_layer_replaced_by_an_architecture_technique_keeps_its_cut_name():
    steps = [SeparableConfig(which="all_but_first"), LowRankConfig(rank_fraction=0.2), EarlyExitConfig(after="conv2+fc1")]
    model = compress(lenet5(), Pipeline(steps=steps), X[:1]).model
    assert model.cut_names == ("conv2", "fc1")  # conv2 is a depthwise + pointwise pair now, fc1 two linears


def test_placements_are_strings_joined_by_plus_or_lists():
    assert EarlyExitConfig(after="pool1+pool2").after == ("pool1", "pool2")
    assert EarlyExitConfig(after=["pool1"]).after == ("pool1",)
    with pytest.raises(ValidationError, match="threshold"):
        EarlyExitConfig(threshold=1.0)


def test_an_unknown_cut_point_is_named_with_the_ones_that_exist():
    with pytest.raises(ValueError, match=r"'pool9' is not a cut point of this model; cut points: conv1, pool1, conv2"):
        early(after="pool1+pool9")


def test_heads_sit_after_the_chosen_cuts_and_training_returns_every_exit():
    model = early(after="pool2+pool1").model
    assert isinstance(model, EarlyExitNet) and model.cut_names == ("pool1", "pool2")
    # 20 channels after pool1, pooled to 4x4 positions: 320 inputs; pool2 leaves 50 x 4 x 4 = 800
    assert [head.linear.in_features for head in model.heads] == [320, 800]
    outputs = model.train()(X[:4])
    assert [o.shape for o in outputs] == [(4, 10)] * 3


def test_fine_tuning_minimises_the_sum_of_every_exits_loss():
    seen = []

    def fine_tune(model, loss_fn):
        model.train()
        labels = torch.arange(8) % 10
        outputs = model(X[:8])
        seen.append((loss_fn(outputs, labels, X[:8]).item(), sum(F.cross_entropy(o, labels).item() for o in outputs)))

    compress(lenet5(), Pipeline(steps=[EarlyExitConfig(after="pool1+fc1")]), X[:1], fine_tune=fine_tune)
    (loss, summed), = seen
    assert loss == pytest.approx(summed, rel=1e-6)


@torch.no_grad()
def confidence(logits):
    return F.softmax(logits, dim=1).amax(dim=1)


def test_each_sample_leaves_at_its_first_confident_exit():
    model = early(after="pool1+pool2").model
    first, second, final = (o.detach() for o in model.all_outputs(X))
    # a threshold between the confidences of the first exit sends some samples each way
    model.threshold = float(confidence(first).median())
    logits, exits = model.exit_forward(X)
    leave_first = confidence(first) >= model.threshold
    leave_second = ~leave_first & (confidence(second) >= model.threshold)
    expected = torch.where(leave_first, 0, torch.where(leave_second, 1, 2))
    assert torch.equal(exits, expected) and 0 < int(leave_first.sum()) < len(X)
    chosen = torch.stack([(first, second, final)[e][i] for i, e in enumerate(exits.tolist())])
    torch.testing.assert_close(logits, chosen)
    torch.testing.assert_close(model.eval()(X), chosen)


def test_artifact_reloads_with_its_exits(tmp_path):
    compressed = compress(
        lenet5(), Pipeline(steps=[EarlyExitConfig(after="pool1"), PruningConfig(granularity="channel", ratio=0.5)]), X[:1]
    )
    save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    restored = load_artifact(tmp_path / "m.safetensors", lenet5()).model
    assert isinstance(restored, EarlyExitNet)
    for a, b in zip(restored.all_outputs(X), compressed.model.all_outputs(X)):
        torch.testing.assert_close(a, b)
    # channel pruning shrank the exit head's input with the layer before it, and kept its 10 classes
    assert restored.heads[0].linear.in_features == 8 * 16 and restored.heads[0].linear.out_features == 10


def test_the_recipe_records_the_cut_point_the_default_placement_resolved_to():
    model = lenet5(image_size=16)
    applied = compress(model, Pipeline(steps=[EarlyExitConfig()]), torch.zeros(1, 1, 16, 16)).pipeline
    assert applied.steps[0].after == ("pool2",)  # the middle cut point, by its name; the config asked for ()
    assert Pipeline.from_recipe(applied.recipe()).steps[0].after == ("pool2",)
