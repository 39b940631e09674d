"""Transformers: whole heads pruned, the embedding width kept, every technique on attention, through the artifact and ONNX."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from netshrink.deploy.onnx_export import export_onnx
from netshrink.deploy.measure import ort_session
from netshrink.spaces import SearchSpace
from netshrink.spaces.probe import probe
from netshrink.tasks.models import ViT
from netshrink.techniques import (
    ClusteringConfig, EarlyExitConfig, LowRankConfig, Pipeline, PruningConfig, QuantizationConfig, compress, exit_points, load_artifact,
    save_artifact,
)
from tests.models import SplitHeads, TorchEncoder

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def vit() -> ViT:
    torch.manual_seed(0)
    return ViT(dim=16, depth=2, num_heads=4, mlp_ratio=2.0).eval()


def round_trip(factory, pipeline: Pipeline, tmp_path):
    """Compress, save, load into a fresh model, export; the reloaded model and its ONNX export compute what the compressed one does."""
    compressed = compress(factory(), pipeline, X[:1])
    save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    restored = load_artifact(tmp_path / "m.safetensors", factory()).model
    with torch.no_grad():
        torch.testing.assert_close(restored(X), compressed.model(X), rtol=1e-5, atol=1e-6)
        export_onnx(restored, X[:1], tmp_path / "m.onnx", compressed.encodings)
        onnx_logits = ort_session(tmp_path / "m.onnx").run(None, {"input": X[:1].numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(onnx_logits), restored(X[:1]), rtol=1e-4, atol=1e-5)
    return compressed, restored


def test_whole_heads_go_and_the_embedding_width_stays(tmp_path):
    compressed, restored = round_trip(vit, Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5, head_ratio=0.5)]), tmp_path)
    assert compressed.pipeline.steps[0].heads == {"blocks.0.attn.num_heads": 2, "blocks.1.attn.num_heads": 2}
    for block in restored.blocks:
        assert block.attn.num_heads == 2 and block.attn.head_dim == 4  # heads keep their width
        assert block.attn.qkv.weight.shape == (3 * 2 * 4, 16) and block.attn.proj.weight.shape == (16, 8)
        assert block.mlp[0].out_features == 16  # ratio: half the MLP's 32 hidden neurons
        assert block.norm1.normalized_shape == (16,)  # the residual stream keeps its width
    assert restored.pos_embed.shape == (1, 16, 16) and restored.patch_embed.out_features == 16


@pytest.mark.parametrize("scope, steps", [("layer", 3), ("global", 2)])
def test_every_attention_layer_keeps_a_head(scope, steps):
    """Torch-Pruning's own iterative and global head pruning can take a layer's last head; netshrink's cannot."""
    pipeline = Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.3, head_ratio=0.75, steps=steps, scope=scope)])
    compressed = compress(vit(), pipeline, X[:1])
    assert set(compressed.pipeline.steps[0].heads.values()) == {1}
    assert compressed.model(X).shape == (4, 10)


def test_without_head_ratio_q_k_v_keep_their_heads():
    compressed = compress(vit(), Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5)]), X[:1])
    assert all(block.attn.qkv.out_features == 48 and block.attn.num_heads == 4 for block in compressed.model.blocks)
    assert compressed.pipeline.steps[0].heads == {}


def test_low_rank_factors_qkv_proj_and_mlp_and_heads_still_go_whole(tmp_path):
    pipeline = Pipeline(steps=[LowRankConfig(rank_fraction=0.25), PruningConfig(granularity="channel", ratio=0.4, head_ratio=0.5)])
    compressed, restored = round_trip(vit, pipeline, tmp_path)
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.3"} <= set(compressed.pipeline.steps[0].ranks)
    assert "head" not in compressed.pipeline.steps[0].ranks  # the classifier stays whole
    assert all(block.attn.num_heads == 2 for block in restored.blocks)


def test_early_exits_between_blocks_average_the_tokens(tmp_path):
    assert "blocks.0" in exit_points(vit())
    pipeline = Pipeline(steps=[EarlyExitConfig(after="blocks.0", threshold=0.5), QuantizationConfig(bits=8)])
    compressed, restored = round_trip(vit, pipeline, tmp_path)
    assert compressed.pipeline.steps[0].pooling == ("tokens",)
    assert restored.heads[0].tokens and restored.heads[0].linear.in_features == 16  # the mean token, not 16 x 16 values


@pytest.mark.parametrize(
    "pipeline",
    [
        Pipeline(steps=[QuantizationConfig(bits=4)]),
        Pipeline(steps=[ClusteringConfig(clusters=8, huffman=True)]),
        Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.8)]),
    ],
    ids=["int4", "clustered", "weight-pruned"],
)
def test_pytorch_attention_in_proj_weight_is_compressed_like_any_weight(pipeline, tmp_path):
    """nn.MultiheadAttention keeps q, k and v in one Parameter, not a Linear: it is found and stored compressed too."""
    compressed, _ = round_trip(TorchEncoder, pipeline, tmp_path)
    assert "encoder.layers.0.self_attn.in_proj_weight" in compressed.encodings
    assert "encoder.layers.0.self_attn.out_proj.weight" in compressed.encodings


def test_pytorch_attention_keeps_its_heads_and_its_width_while_the_mlp_is_pruned(tmp_path):
    compressed, restored = round_trip(TorchEncoder, Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5)]), tmp_path)
    layer = restored.encoder.layers[0]
    assert layer.linear1.out_features == 16 and layer.self_attn.in_proj_weight.shape == (48, 16)
    with pytest.raises(ValueError, match="pruning.head_ratio: 'encoder.layers.0.self_attn' is a torch.nn.MultiheadAttention"):
        compress(TorchEncoder(), Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5, head_ratio=0.5)]), X[:1])


def test_pytorch_encoder_layers_are_cut_points_and_their_linears_are_left_whole_by_low_rank_with_a_note(tmp_path):
    assert {"encoder.layers.0", "encoder.layers.1"} <= set(exit_points(TorchEncoder()))
    compressed, _ = round_trip(TorchEncoder, Pipeline(steps=[LowRankConfig(rank_fraction=0.25), EarlyExitConfig(after="encoder.layers.0")]), tmp_path)
    assert set(compressed.pipeline.steps[0].ranks) == {"embed"}  # linear1/linear2 are read by their layer's fast path
    assert any("encoder.layers.0.linear1" in note and "reads its weight directly" in note for note in compressed.notes)


def test_validation_refuses_what_cannot_work_naming_the_technique():
    separable = probe(SearchSpace.model_validate({"separable": {}, "quantization": {}}), vit(), X[:1])
    assert separable and separable[0].startswith("space.separable: the model has no ungrouped k x k Conv2d")
    opaque = probe(SearchSpace.model_validate({"pruning": {"granularity": "channel", "head_ratio": 0.5}}), OpaqueHeads(), X[:1])
    assert opaque and "pruning.head_ratio: heads were found in ''" in opaque[0] and "set head_ratio to 0" in opaque[0]
    assert probe(SearchSpace.model_validate({"pruning": {"granularity": "channel", "head_ratio": {"low": 0.0, "high": 0.75}}, "lowrank": {}}), vit(), X[:1]) == []


class OpaqueHeads(SplitHeads):
    """Hand-written attention that reshapes by a head count kept under a name that says nothing of heads."""

    def __init__(self) -> None:
        super().__init__()
        self.h = self.heads
        del self.heads

    def forward(self, x):
        tokens = self.embed(x.reshape(x.shape[0], 8, 8))
        b, n, c = tokens.shape
        q, k, v = (layer(tokens).reshape(b, n, self.h, -1).transpose(1, 2) for layer in (self.q, self.k, self.v))
        mixed = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.head(self.out(mixed).mean(dim=1))


class TimmHeads(nn.Module):
    """timm-style attention that keeps its head count as ``heads``: one ``qkv`` reshaped into (3, heads, head_dim)."""

    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.embed = nn.Linear(8, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 32), nn.Linear(32, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        tokens = self.embed(x.reshape(x.shape[0], 8, 8))
        b, n, _ = tokens.shape
        q, k, v = self.qkv(tokens).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        tokens = tokens + self.proj(((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))
        tokens = tokens + self.fc2(torch.relu(self.fc1(tokens)))
        return self.head(tokens.mean(dim=1))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_hand_written_heads_are_found_by_their_reshape_and_go_whole(scope, tmp_path):
    """A timm-style block that keeps its head count as ``heads`` (not ``num_heads``): global channel pruning failed on it
    (``IndexError: index 64 is out of bounds``). Its heads are found from the reshape of ``qkv`` and go whole; the
    recipe records the attribute set, and loading sets it again."""
    pipeline = Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5, scope=scope, head_ratio=0.5)])
    compressed, restored = round_trip(TimmHeads, pipeline, tmp_path)
    assert compressed.pipeline.steps[0].heads == {"heads": 2}
    assert restored.heads == 2 and restored.qkv.out_features == 24 and restored.proj.in_features == 8
    assert restored.fc1.out_features == 16  # the MLP lost half its neurons


def test_attention_whose_head_size_follows_the_token_width_keeps_its_widths_and_says_why_its_heads_stay():
    """``SplitHeads`` reshapes q, k and v by ``c // heads`` with ``c`` the token width: channel pruning keeps q, k, v and
    the tokens they read whole (it pruned them once and broke the reshape), and removing heads is refused by name."""
    compressed = compress(SplitHeads(), Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5)]), X[:1])
    model = compressed.model
    assert model.embed.out_features == model.q.out_features == model.out.in_features == 16
    assert model(X).shape == (4, 10)
    with pytest.raises(ValueError, match=r"pruning.head_ratio: heads were found in '' \(its q, k, v outputs are reshaped into heads\).*set head_ratio to 0"):
        compress(SplitHeads(), Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5, head_ratio=0.5)]), X[:1])
