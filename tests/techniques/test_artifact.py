"""The artifact file: small floats at float16 where that loses nothing, and the compressed header."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from netshrink.tasks.models import LeNet5
from netshrink.techniques import ClusteringConfig, Pipeline, PruningConfig, QuantizationConfig, compress, load_artifact, save_artifact
from netshrink.techniques.artifact import FORMAT, read_artifact, read_header, read_parts
from netshrink.techniques.encoding import TensorEncoding, decode_tensor, encode_tensor, plan_layout, to_half_grid
from netshrink.techniques.quantization import fake_quantize

IMAGES = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("on_grid, stored", [(True, torch.float16), (False, torch.float32)])
def test_a_float_part_is_stored_at_float16_only_where_that_is_exact(on_grid, stored):
    bias = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 0.05
    bias = to_half_grid(bias) if on_grid else bias
    parts = encode_tensor("b", bias, TensorEncoding())
    assert parts["b.values"].dtype == stored
    assert sum(t.numel() * t.element_size() for t in parts.values()) == TensorEncoding().payload_bytes(bias) == 300 * (2 if on_grid else 4)
    assert torch.equal(decode_tensor("b", parts, (300,), TensorEncoding(), plan_layout(bias, TensorEncoding())), bias)


def test_biases_on_the_half_grid_include_subnormals_but_tiny_scales_stay_float32():
    # a bias of 1e-6 is off by at most 2^-25 as a float16 subnormal; a scale of 1e-7 would keep 1 significant bit
    tiny = torch.tensor([1e-6, 1e5])  # a float16 subnormal, and a value over float16's range
    rounded = to_half_grid(tiny)
    assert rounded[0] != tiny[0] and abs(rounded[0] - tiny[0]) <= 2**-25 and rounded[1] == tiny[1]
    assert torch.equal(to_half_grid(tiny, relative=True), tiny)
    weight = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 1e-5  # scales max|w|/127 ~ 3e-7
    weight[0] *= 1e5  # one channel at an ordinary magnitude
    encoding = TensorEncoding(bits=8)
    quantized = fake_quantize(weight, 8)
    parts = encode_tensor("w", quantized, encoding)
    assert parts["w.scale"].dtype == torch.float32  # one scale float16 cannot hold well keeps the tensor's scales float32
    assert torch.equal(decode_tensor("w", parts, (4, 50), encoding, plan_layout(quantized, encoding)), quantized)
    relative = (quantized - weight).abs().amax(dim=1) / weight.abs().amax(dim=1)
    assert (relative <= 0.5 / 127 + 1e-6).all()  # every channel keeps its 8-bit precision


@pytest.mark.parametrize("step", [QuantizationConfig(bits=8), QuantizationConfig(bits=2), QuantizationConfig(bits=16), ClusteringConfig(clusters=16, huffman=True)])
def test_quantized_and_clustered_layers_store_codebooks_and_biases_at_float16_and_reload_exactly(step, tmp_path):
    compressed = compress(LeNet5(), Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.9), step]), IMAGES[:1])
    save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    parts, _ = read_parts(tmp_path / "m.safetensors")
    codebook = "scale" if step.kind == "quantization" and step.bits != 16 else "centroids" if step.kind == "clustering" else None
    for layer in ("conv1", "fc1", "fc2"):
        assert parts[f"{layer}.bias.values"].dtype == torch.float16
        if codebook:
            assert parts[f"{layer}.weight.{codebook}"].dtype == torch.float16
    state, _ = read_artifact(tmp_path / "m.safetensors")
    assert all(torch.equal(state[name], value) for name, value in compressed.model.state_dict().items())
    reloaded = load_artifact(tmp_path / "m.safetensors", LeNet5()).model
    assert torch.equal(reloaded(IMAGES), compressed.model(IMAGES))


def test_pruning_alone_keeps_float32_values_and_biases(tmp_path):
    compressed = compress(LeNet5(), Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.5)]), IMAGES[:1])
    save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    parts, _ = read_parts(tmp_path / "m.safetensors")
    assert parts["fc1.bias.values"].dtype == parts["fc1.weight.values"].dtype == torch.float32


def test_the_header_is_compressed_json_that_read_header_gives_back(tmp_path):
    compressed = compress(LeNet5(), Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.9), QuantizationConfig(bits=4)]), IMAGES[:1])
    recipe = compressed.pipeline.recipe()
    save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, recipe)
    with safe_open(tmp_path / "m.safetensors", framework="pt") as handle:
        stored = handle.metadata()["netshrink"]
    header = read_header(tmp_path / "m.safetensors")
    assert header["format"] == FORMAT and header["recipe"] == json.loads(recipe)
    assert set(header["entries"]) == set(compressed.model.state_dict())
    plain = json.dumps(header, separators=(",", ":"))
    assert not stored.startswith("{") and len(stored) < 0.6 * len(plain)  # repeated key names compress well


def test_an_artifact_of_an_older_format_is_refused_naming_both_formats(tmp_path):
    header = {"format": "netshrink-artifact/3", "entries": {}, "recipe": {"steps": []}}
    save_file({"x": torch.zeros(1)}, str(tmp_path / "old.safetensors"), metadata={"netshrink": json.dumps(header)})
    with pytest.raises(ValueError, match=r"netshrink-artifact/3.*expected 'netshrink-artifact/4'"):
        read_artifact(tmp_path / "old.safetensors")


def test_metadata_that_is_neither_json_nor_compressed_json_is_refused(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"), metadata={"netshrink": "not a header"})
    with pytest.raises(ValueError, match="neither JSON nor compressed JSON"):
        read_artifact(tmp_path / "bad.safetensors")


class TiedEmbeddings(torch.nn.Module):
    """Input and output embeddings sharing one tensor, as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 16)
        self.mix = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(torch.relu(self.mix(self.embed(ids).mean(1))))


@pytest.mark.parametrize("step", [None, QuantizationConfig(bits=4), ClusteringConfig(clusters=8), PruningConfig(granularity="weight", ratio=0.5)])
def test_tied_embeddings_are_compressed_and_stored_once_and_reload_tied(step, tmp_path):
    ids = torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(0))
    compressed = compress(TiedEmbeddings().eval(), Pipeline(steps=[step] if step else []), ids[:1])
    assert compressed.model.out.weight is compressed.model.embed.weight
    save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    parts, header = read_parts(tmp_path / "m.safetensors")
    assert header.entries["out.weight"].same_as == "embed.weight" and not any(key.startswith("out.") for key in parts)
    if step is not None:
        assert "embed.weight" in compressed.encodings  # the embedding is compressed like any weight
    restored = load_artifact(tmp_path / "m.safetensors", TiedEmbeddings()).model
    assert restored.out.weight is restored.embed.weight
    assert torch.equal(restored(ids), compressed.model(ids))
