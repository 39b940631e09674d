"""The contract on the families users ship (``tests/families.py``): a CIFAR-style ResNet-18 and a MobileNetV2 in
torchvision's layout, Hugging Face BERT and ViT fed dict batches. Every technique and every choice of its default
space: the forward runs, the artifact's bytes are the accounted bytes, the recipe as applied replays (through the
artifact) to the same model, and the exported ONNX model computes what torch computes."""

from __future__ import annotations

import struct

import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file

from netshrink.deploy.onnx_export import export_onnx
from netshrink.deploy.sizes import size_note
from netshrink.techniques import REGISTRY, Pipeline, TensorEncoding, compress, load_artifact, save_artifact
from netshrink.techniques.inputs import forward_logits
from netshrink.techniques.sensitivity import measure_sensitivity
from tests.families import FAMILIES, family_inputs
from tests.techniques.test_contract import CONFIGS, cross_entropy

pytest.importorskip("transformers")


def fine_tune_family(name):
    def tune(model, loss_fn=None):
        torch.manual_seed(0)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        model.train()
        for step in range(2):
            inputs = family_inputs(name, 4, seed=step)
            loss = (loss_fn or cross_entropy)(forward_logits(model, inputs), torch.randint(0, 10, (4,)), inputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()

    return tune


def accounted_bytes(model, encodings) -> int:
    total = 0
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            total += encodings.get(name, TensorEncoding()).payload_bytes(value)
        else:
            total += value.numel() * value.element_size()
    return total


def first_of_each_kind(configs):
    """One config per technique (the first choice of each knob), for the default run; ``-m slow`` runs them all."""
    kinds, chosen = set(), []
    for case in configs:
        kind = case.values[0].kind
        chosen.append(case if kind not in kinds else pytest.param(*case.values, id=case.id, marks=pytest.mark.slow))
        kinds.add(kind)
    return chosen


@pytest.mark.parametrize("config", first_of_each_kind(CONFIGS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_technique_on_the_families_users_ship(family, config, tmp_path):
    from netshrink.deploy.onnx_export import exports_faithfully

    model = FAMILIES[family]().eval()
    reason = REGISTRY[config.kind].inapplicable(model)
    if reason is not None:  # validation refuses it in the space, naming the reason
        assert config.kind == "separable" and family in ("bert", "vit"), reason
        return
    example, batch = family_inputs(family, 1), family_inputs(family, 4, seed=9)
    scores = measure_sensitivity(model, [(batch, torch.randint(0, 10, (4,)))]) if getattr(config, "allocation", None) == "sensitivity" else None
    compressed = compress(model, Pipeline(steps=[config]), example, fine_tune=fine_tune_family(family), sensitivity=scores)
    assert forward_logits(compressed.model, batch).shape == (4, 10)
    path = tmp_path / "m.safetensors"
    written = save_artifact(path, compressed.model, compressed.encodings, compressed.pipeline.recipe())
    accounted = accounted_bytes(compressed.model, compressed.encodings)
    assert sum(t.numel() * t.element_size() for t in load_file(path).values()) == accounted
    assert written == path.stat().st_size == 8 + struct.unpack("<Q", path.read_bytes()[:8])[0] + accounted
    restored = load_artifact(path, FAMILIES[family]()).model
    torch.testing.assert_close(forward_logits(restored, batch), forward_logits(compressed.model, batch), rtol=1e-4, atol=1e-5)
    exports_faithfully(compressed.model, compressed.encodings, example)
    # model.onnx ships what was measured: its weights take the artifact's bytes, give or take 10%, wherever ONNX has
    # the artifact's storage (dense weights at 32, 16, 8 or 4 bits; clustered ones as indices); elsewhere the card says why
    onnx_bytes = export_onnx(compressed.model, example, tmp_path / "m.onnx", compressed.encodings)
    onnx_payload = sum(len(init.raw_data) or numpy_helper.to_array(init).nbytes for init in onnx.load(tmp_path / "m.onnx").graph.initializer)
    plans = compressed.encodings.values()
    # ONNX's integers are 4 or 8 bits wide: narrower codes, and cluster indices of other widths, take more room there
    if any(plan.sparse or plan.bits in (1, 2) or plan.huffman or plan.clusters not in (None, 16, 256) for plan in plans):
        assert onnx_bytes <= 1.1 * written or "model.onnx is" in size_note(compressed.encodings, written, onnx_bytes)
    elif family in ("resnet18", "mobilenet_v2"):
        assert onnx_payload <= 1.1 * accounted, (onnx_payload, accounted)
    else:  # these transformers are 32 wide: a row's float32 scale and bias (float16 in the artifact) weigh on it
        assert onnx_payload <= 1.1 * accounted or "float32 per-channel scales" in size_note(compressed.encodings, written, onnx_bytes)


@pytest.mark.parametrize("family", ["resnet18", "mobilenet_v2"])
def test_a_separable_stem_then_channel_pruning_keeps_the_images_channels(family, tmp_path):
    """``separable(which=all)`` then channel pruning broke every RGB model mid-search (``weight of size [1, 1, 3, 3],
    expected input[200, 3, 32, 32] to have 1 channels``): the depthwise stem reading the image lost two of its three
    channels. It keeps them; the rest of the network is pruned."""
    from netshrink.deploy.onnx_export import exports_faithfully
    from netshrink.techniques import PruningConfig, SeparableConfig

    model = FAMILIES[family]().eval()
    pipeline = Pipeline(steps=[SeparableConfig(which="all"), PruningConfig(granularity="channel", ratio=0.8, scope="global")])
    compressed = compress(model, pipeline, family_inputs(family, 1))
    stem = compressed.model.conv1 if family == "resnet18" else compressed.model.features[0][0]
    assert stem[0].in_channels == stem[0].out_channels == stem[0].groups == 3
    assert sum(p.numel() for p in compressed.model.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
    save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    restored = load_artifact(tmp_path / "m.safetensors", FAMILIES[family]()).model
    batch = family_inputs(family, 4, seed=3)
    torch.testing.assert_close(forward_logits(restored, batch), forward_logits(compressed.model, batch), rtol=1e-4, atol=1e-5)
    exports_faithfully(compressed.model, compressed.encodings, family_inputs(family, 1))


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_hugging_face_models_get_exits_between_encoder_layers_that_onnx_runtime_takes(family, tmp_path):
    """torch.fx cannot trace a Hugging Face model, so exits go between the blocks of its layer stack (hooks, a head on the
    first token); the exported graph leaves at the exit when it is confident, as the torch model does sample by sample."""
    from netshrink.deploy.measure import ort_session
    from netshrink.deploy.onnx_export import export_onnx
    from netshrink.techniques import BlockExitNet, EarlyExitConfig, exit_points
    from netshrink.techniques.inputs import numpy_feed

    model = FAMILIES[family]().eval()
    stack = "bert.encoder.layer" if family == "bert" else "vit.layers"
    assert exit_points(model) == [f"{stack}.0"]  # 2 layers: one cut point, the last layer's output is the final exit
    example = family_inputs(family, 1)
    for threshold, answered_by in ((0.01, 0), (0.99, 1)):  # every sample confident enough at the exit; none
        compressed = compress(model, Pipeline(steps=[EarlyExitConfig(threshold=threshold)]), example)
        assert isinstance(compressed.model, BlockExitNet) and compressed.pipeline.steps[0].pooling == ("cls",)
        export_onnx(compressed.model, example, tmp_path / "m.onnx", compressed.encodings)
        logits, exit_index = ort_session(tmp_path / "m.onnx").run(None, numpy_feed(example))
        assert int(exit_index) == answered_by
        torch.testing.assert_close(torch.from_numpy(logits), forward_logits(compressed.model, example), rtol=1e-3, atol=1e-4)


IMAGE_SPACE = {kind: None for kind in ("separable", "lowrank", "early_exit", "distillation", "pruning", "quantization", "clustering")}
TEXT_SPACE = {
    "lowrank": None, "early_exit": None, "distillation": None, "quantization": None, "clustering": None,
    "pruning": {"granularity": ["channel", "weight"], "head_ratio": {"low": 0.0, "high": 0.75}},
}


@pytest.mark.parametrize(
    "family", ["resnet18", pytest.param("mobilenet_v2", marks=pytest.mark.slow), pytest.param("bert", marks=pytest.mark.slow), pytest.param("vit", marks=pytest.mark.slow)]
)
def test_the_probe_of_the_default_space_finds_nothing_that_breaks_a_family(family):
    """Each structural technique alone, every two of them together at their extreme settings (separable(which=all)
    then channel pruning is among them), and random draws: all run and export on each family."""
    from netshrink.spaces import SearchSpace
    from netshrink.spaces.probe import _pairs, probe

    space = SearchSpace.model_validate(IMAGE_SPACE if family in ("resnet18", "mobilenet_v2") else TEXT_SPACE)
    pairs = [pipeline.describe() for pipeline in _pairs(space)]
    if family == "resnet18":
        assert any(p.startswith("separable(which=all) + pruning(granularity=channel") for p in pairs)
    assert probe(space, FAMILIES[family]().eval(), family_inputs(family, 1)) == []


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_4_bit_weights_of_a_model_with_block_exits_load_in_onnx_runtime_with_its_defaults(family, tmp_path):
    """ONNX Runtime looks for a quantized MatMul weight in the main graph (``TransposeDQWeightsForMatMulNBits``); a
    ``DequantizeLinear`` inside an exit's branch made every such model fail to load ("Missing required weight")."""
    import onnxruntime as ort

    from netshrink.deploy.onnx_export import export_onnx
    from netshrink.techniques import EarlyExitConfig, LowRankConfig, QuantizationConfig
    from netshrink.techniques.inputs import numpy_feed

    example = family_inputs(family, 1)
    steps = [LowRankConfig(rank_fraction=0.3), EarlyExitConfig(threshold=0.99), QuantizationConfig(bits=4)]
    compressed = compress(FAMILIES[family]().eval(), Pipeline(steps=steps), example)
    export_onnx(compressed.model, example, tmp_path / "m.onnx", compressed.encodings)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    logits, _ = session.run(None, numpy_feed(example))
    # with its defaults ONNX Runtime runs 4-bit MatMuls with its own kernels (MatMulNBits), which round differently
    torch.testing.assert_close(torch.from_numpy(logits), forward_logits(compressed.model, example), rtol=1e-2, atol=1e-3)


def static_int8_export(family: str, path):
    """``family`` under ``quantization(bits=8, activations=int8)`` (calibrated on 32 training samples), saved and reloaded
    as an artifact, exported to ``path`` as static int8; returns the reloaded artifact."""
    from netshrink.deploy.onnx_export import export_artifact
    from netshrink.techniques import QuantizationConfig

    calibration = family_inputs(family, 32, seed=5)
    compressed = compress(
        FAMILIES[family]().eval(), Pipeline(steps=[QuantizationConfig(bits=8, activations="int8")]), family_inputs(family, 1),
        calibration_inputs=calibration,
    )
    artifact = path.with_suffix(".safetensors")
    save_artifact(artifact, compressed.model, compressed.encodings, compressed.pipeline.recipe())
    loaded = load_artifact(artifact, FAMILIES[family]())
    export_artifact(loaded, family_inputs(family, 1), path, calibration)
    return loaded


@pytest.mark.parametrize("family", ["resnet18", "mobilenet_v2"])
def test_static_int8_on_the_cnns_runs_with_integer_kernels_and_agrees_with_torch(family, tmp_path):
    """``activations: int8`` on residual stages and inverted residuals: ONNX Runtime's QDQ model (calibrated on training
    samples) answers as the fake-quantized torch model does."""
    import onnx

    from netshrink.deploy.measure import ort_session
    from netshrink.techniques.inputs import numpy_feed

    loaded = static_int8_export(family, tmp_path / "m.onnx")
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) >= 10  # activations quantized throughout
    batch = family_inputs(family, 16, seed=6)
    session = ort_session(tmp_path / "m.onnx")
    onnx_logits = torch.cat([torch.from_numpy(session.run(None, numpy_feed(batch[i : i + 1]))[0]) for i in range(16)])
    torch_logits = forward_logits(loaded.model.eval(), batch)
    assert (onnx_logits.argmax(1) == torch_logits.argmax(1)).float().mean() >= 0.8
    torch.testing.assert_close(onnx_logits, torch_logits, rtol=0.1, atol=0.1 * float(torch_logits.abs().max()))


def test_static_int8_on_bert_leaves_the_attention_softmax_and_its_mask_in_float(tmp_path):
    """ONNX Runtime's default static quantization also quantizes Add, Mul and Softmax, which the torch side never
    simulates: on a trained BERT the ONNX file then answered 32.6% of the sentences right where the torch model answered
    99.8% (benchmarks/deploy.py --tasks bert). Only the matrix products' inputs are quantized: the masked attention
    scores reach Softmax in float (its output, an input of the probabilities-by-values MatMul, is quantized; with
    MatMul and Gemm alone quantized the trained BERT's file kept the float file's 99.4%)."""
    import onnx

    static_int8_export("bert", tmp_path / "m.onnx")
    graph = onnx.load(tmp_path / "m.onnx").graph
    produced_by = {output: node.op_type for node in graph.node for output in node.output}
    assert any(node.op_type == "Softmax" for node in graph.node)
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) >= 8  # the matrix products' inputs
    for node in graph.node:
        if node.op_type == "Softmax":
            assert produced_by.get(node.input[0]) != "DequantizeLinear", "the attention scores reach Softmax through int8"


def test_the_recipe_records_what_pruning_removed_per_layer_and_a_replay_that_differs_is_refused():
    from netshrink.techniques import PruningConfig

    model, example = FAMILIES["resnet18"]().eval(), family_inputs("resnet18", 1)
    compressed = compress(model, Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5)]), example)
    removed = compressed.pipeline.steps[0].removed
    assert removed["layer1.0.conv1"] == 4 and "fc" not in removed  # 8 channels, half went; the classes stay
    # channels coupled across a skip connection go together: the stem and every block's output in layer1
    assert removed.get("conv1") == removed.get("layer1.0.conv2") == removed.get("layer1.1.conv2")
    assert compressed.model.layer1[0].conv1.out_channels == 8 - removed["layer1.0.conv1"]
    tampered = compressed.pipeline.steps[0].model_copy(update={"removed": {**removed, "layer1.0.conv1": 3}})
    with pytest.raises(ValueError, match="pruning.removed: the recipe removed 3 from 'layer1.0.conv1' and this replay 4"):
        compress(model, Pipeline(steps=[tampered]), example)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_hugging_face_heads_go_whole_and_the_config_follows(family, tmp_path):
    """Half the heads of every layer: q, k and v lose whole heads, the attention modules' ``num_attention_heads`` and
    ``all_head_size`` and the model's ``config.num_attention_heads`` say so, the FFN loses neurons, the hidden size
    stays, and the artifact reloads into a fresh model (the recipe sets the same attributes) and exports."""
    from netshrink.deploy.onnx_export import exports_faithfully
    from netshrink.techniques import PruningConfig

    example = family_inputs(family, 1)
    compressed = compress(FAMILIES[family]().eval(), Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5, head_ratio=0.5)]), example)
    model = compressed.model
    layer = model.bert.encoder.layer[0] if family == "bert" else model.vit.layers[0]
    attention = layer.attention.self if family == "bert" else layer.attention
    query = attention.query if family == "bert" else attention.q_proj
    assert query.out_features == 16 and query.in_features == 32  # 2 of 4 heads of 8; the hidden size stays
    assert attention.num_attention_heads == 2 and model.config.num_attention_heads == 2
    if family == "bert":
        assert attention.all_head_size == 16 and layer.intermediate.dense.out_features == 64
    heads = compressed.pipeline.steps[0].heads
    assert heads["config.num_attention_heads"] == 2
    save_artifact(tmp_path / "m.safetensors", model, compressed.encodings, compressed.pipeline.recipe())
    restored = load_artifact(tmp_path / "m.safetensors", FAMILIES[family]()).model
    assert restored.config.num_attention_heads == 2
    batch = family_inputs(family, 4, seed=1)
    torch.testing.assert_close(forward_logits(restored, batch), forward_logits(model, batch), rtol=1e-4, atol=1e-5)
    exports_faithfully(model, compressed.encodings, example)


def test_low_rank_reaches_a_resnets_3x3_convolutions_as_channel_decomposition(tmp_path):
    """A ResNet's only Linear is its classifier, which low-rank keeps: ``convs: all`` factors its 3x3 convolutions into a
    3x3 convolution to K channels and a 1x1 back, with stride and padding kept."""
    from netshrink.deploy.onnx_export import exports_faithfully
    from netshrink.techniques import LowRankConfig

    example = family_inputs("resnet18", 1)
    model = FAMILIES["resnet18"]().eval()
    assert not compress(model, Pipeline(steps=[LowRankConfig(rank_fraction=0.25)]), example).pipeline.steps[0].ranks  # the fc is kept
    compressed = compress(model, Pipeline(steps=[LowRankConfig(rank_fraction=0.25, convs="all")]), example)
    ranks = compressed.pipeline.steps[0].ranks
    assert ranks["layer4.0.conv2"] == 16 and "fc" not in ranks  # 64 x (64 x 3 x 3) at a quarter of 64
    first, second = compressed.model.layer2[0].conv1
    assert first.kernel_size == (3, 3) and first.stride == (2, 2) and second.kernel_size == (1, 1)
    assert sum(p.numel() for p in compressed.model.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
    save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    restored = load_artifact(tmp_path / "m.safetensors", FAMILIES["resnet18"]()).model
    batch = family_inputs("resnet18", 4, seed=2)
    torch.testing.assert_close(forward_logits(restored, batch), forward_logits(compressed.model, batch), rtol=1e-4, atol=1e-5)
    exports_faithfully(compressed.model, compressed.encodings, example)
