import numpy as np
import pytest
import torch
from pydantic import ValidationError
from netshrink.techniques.artifact import read_parts

from netshrink.tasks.models import LeNet5
from netshrink.techniques import ClusteringConfig, Pipeline, PruningConfig, QuantizationConfig, compress, load_artifact, save_artifact
from netshrink.techniques import huffman
from netshrink.techniques.clustering import kmeans_1d
from netshrink.techniques.encoding import TensorEncoding, decode_tensor, encode_tensor, pack_bits, plan_layout, unpack_bits

LENET_INPUT = torch.zeros(1, 1, 28, 28)


def weights(model):
    return {name: module.weight.detach() for name, module in model.named_modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))}


@pytest.mark.parametrize("clusters", [2, 5, 16])
def test_at_most_k_values_per_layer_and_pruned_weights_stay_zero(clusters):
    model = LeNet5()
    pipeline = Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.7), ClusteringConfig(clusters=clusters)])
    compressed = compress(model, pipeline, LENET_INPUT)
    pruned = compress(model, Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.7)]), LENET_INPUT)
    for name, weight in weights(compressed.model).items():
        assert weight[weight != 0].unique().numel() <= clusters
        assert torch.equal(weight == 0, weights(pruned.model)[name] == 0)


def test_dense_clustering_keeps_at_most_k_values_and_plans_the_encoding():
    compressed = compress(LeNet5(), Pipeline(steps=[ClusteringConfig(clusters=8, huffman=True)]), LENET_INPUT)
    for weight in weights(compressed.model).values():
        assert weight.unique().numel() <= 8
    assert compressed.encodings["fc1.weight"] == TensorEncoding(clusters=8, huffman=True)


def test_kmeans_starts_linear_and_is_deterministic():
    values = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 10.0])
    centroids, index = kmeans_1d(values, 3)
    torch.testing.assert_close(centroids, torch.tensor([0.1, 5.05, 10.0]))
    assert index.tolist() == [0, 0, 0, 1, 1, 2]
    again, _ = kmeans_1d(values, 3)
    assert torch.equal(centroids, again)


def test_centroids_train_and_weights_stay_on_them():
    model = torch.nn.Linear(30, 4)
    seen = {}

    def fine_tune(m, loss_fn):
        shared = m.parametrizations.weight[0]
        seen["before"] = shared.centroids.detach().clone()
        optimizer = torch.optim.SGD([shared.centroids], lr=0.1)
        loss = m(torch.randn(8, 30)).pow(2).sum()
        loss.backward()
        optimizer.step()
        seen["after"] = shared.centroids.detach().clone()

    compressed = compress(model, Pipeline(steps=[ClusteringConfig(clusters=4)]), torch.zeros(1, 30), fine_tune=fine_tune)
    assert not torch.equal(seen["before"], seen["after"])
    weight = compressed.model.weight.detach()
    assert set(weight.unique().tolist()) <= set(seen["after"].half().float().tolist())  # stored on the float16 grid


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    from netshrink.techniques.clustering import cluster_weight

    torch.manual_seed(0)
    shared = cluster_weight(torch.randn(5, 7), 4, sparse=False)
    weight = shared(torch.empty(5, 7))
    upstream = torch.randn(5, 7)
    (weight * upstream).sum().backward()
    expected = torch.zeros(4).index_add_(0, shared.index.reshape(-1), upstream.reshape(-1))
    torch.testing.assert_close(shared.centroids.grad, expected)


@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 9, 33])
def test_bit_packer_round_trips_any_width(width, count):
    values = np.random.default_rng(width * 100 + count).integers(0, 1 << width, count)
    packed = pack_bits(values, width)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count * width // 8)
    assert np.array_equal(unpack_bits(packed, width, count), values)


def _skewed(count, symbols, seed):
    probabilities = 0.5 ** np.arange(1, symbols + 1)
    return np.random.default_rng(seed).choice(symbols, count, p=probabilities / probabilities.sum())


@pytest.mark.parametrize(
    "symbols",
    [
        np.random.default_rng(0).integers(0, 16, 1001),
        _skewed(999, 32, 1),
        _skewed(13, 5, 2),
        np.full(37, 3),
        np.array([0]),
        np.array([], dtype=np.int64),
        np.random.default_rng(3).integers(0, 256, 5003),
    ],
    ids=["random", "skewed", "skewed-short", "single-symbol", "one-value", "empty", "random-256"],
)
def test_huffman_decode_restores_the_symbols_exactly(symbols):
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=symbols.max(initial=0) + 1))
    stream = huffman.encode(symbols, lengths)
    assert stream.dtype == np.uint8 and stream.size == -(-int(lengths[symbols].sum()) // 8)
    assert np.array_equal(huffman.decode(stream, lengths, symbols.size), symbols)


def test_huffman_decodes_codes_longer_than_the_lookup_table():
    frequencies = np.array([1, 1] + [2**i for i in range(1, 22)])  # Fibonacci-like: the rarest codes get 22 bits
    lengths = huffman.code_lengths(frequencies)
    assert lengths.max() > huffman.TABLE_BITS
    symbols = np.array([0, 1, 22, 0, 5, 1, 21, 3])
    assert np.array_equal(huffman.decode(huffman.encode(symbols, lengths), lengths, symbols.size), symbols)


@pytest.mark.parametrize("seed", range(5))
def test_canonical_code_from_lengths_is_prefix_free(seed):
    rng = np.random.default_rng(seed)
    lengths = huffman.code_lengths(rng.integers(0, 50, 40) ** 2)
    codes = huffman.canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{lengths[s]}b") for s in np.flatnonzero(lengths)]
    assert len(set(words)) == len(words)
    assert not any(a != b and b.startswith(a) for a in words for b in words)
    assert sum(2.0 ** -len(word) for word in words) == pytest.approx(1.0)  # a complete code (Kraft equality)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("use_huffman", [False, True])
@pytest.mark.parametrize("shape", [(3, 7), (5, 3, 3, 3), (1, 1)])
def test_clustered_tensor_round_trips_and_size_is_accounted(shape, use_huffman, sparse):
    centroids = torch.tensor([-0.5, -0.1, 0.2, 0.7, 1.3])
    index = torch.from_numpy(_skewed(int(np.prod(shape)), 5, 4)).reshape(shape)
    weight = centroids[index]
    if sparse:
        weight = weight * (torch.rand(shape, generator=torch.Generator().manual_seed(5)) > 0.5)
    encoding = TensorEncoding(clusters=5, huffman=use_huffman, sparse=sparse)
    layout = plan_layout(weight, encoding)
    stored = encode_tensor("w", weight, encoding, layout)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == encoding.payload_bytes(weight)
    assert torch.equal(decode_tensor("w", stored, shape, encoding, layout), weight)


def test_huffman_is_smaller_than_fixed_width_on_skewed_indices():
    centroids = torch.linspace(-1, 1, 16)
    weight = centroids[torch.from_numpy(_skewed(10_000, 16, 6))]
    fixed = TensorEncoding(clusters=16).payload_bytes(weight)
    coded = TensorEncoding(clusters=16, huffman=True).payload_bytes(weight)
    assert fixed == 4 * weight.unique().numel() + 10_000 * 4 // 8
    assert coded < 0.6 * fixed  # about 2 bits per index instead of 4


def test_encoder_rejects_a_tensor_with_more_values_than_clusters():
    with pytest.raises(ValueError, match="clusters=4"):
        encode_tensor("w", torch.randn(10), TensorEncoding(clusters=4))


def test_encoding_is_clustered_or_reduced_bits_not_both():
    with pytest.raises(ValidationError, match="clustered or at reduced bits"):
        TensorEncoding(clusters=16, bits=8)
    with pytest.raises(ValidationError, match="needs clusters"):
        TensorEncoding(huffman=True)


def test_quantization_and_clustering_are_rejected_with_the_rule_named():
    with pytest.raises(ValidationError, match="'quantization' and 'clustering' cannot both be active: both set the stored weight values"):
        Pipeline(steps=[QuantizationConfig(bits=8), ClusteringConfig()])
    Pipeline(steps=[QuantizationConfig(bits=32), ClusteringConfig()])  # a no-op step does not count


def test_config_bounds():
    with pytest.raises(ValidationError, match="clusters"):
        ClusteringConfig(clusters=1)
    with pytest.raises(ValidationError, match="clusters"):
        ClusteringConfig(clusters=257)


def test_lenet5_pruned_and_clustered_with_huffman_beats_pruned_int8(tmp_path, capsys):
    model = LeNet5()
    x = torch.randn(4, 1, 28, 28)
    sizes = {}
    for label, last in [("int8", QuantizationConfig(bits=8)), ("clustered16+huffman", ClusteringConfig(clusters=16, huffman=True))]:
        pipeline = Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.9), last])
        compressed = compress(model, pipeline, x[:1])
        path = tmp_path / f"{label}.safetensors"
        sizes[label] = save_artifact(path, compressed.model, compressed.encodings, pipeline.recipe())
        restored = load_artifact(path, LeNet5()).model
        torch.testing.assert_close(restored(x), compressed.model(x), rtol=1e-4, atol=1e-5)
        if label != "int8":
            assert read_parts(path)[0]["fc1.weight.code_lengths"].numel() <= 16
    with capsys.disabled():
        print(f"\nLeNet5 pruning(weight, 0.9) artifact bytes: {sizes}")
    # the 1-bit-per-weight sparsity mask (~54 kB of LeNet5's 431k weights) is common to both and dominates
    assert sizes["clustered16+huffman"] < 0.85 * sizes["int8"]


def test_pruned_weights_use_their_centroids_instead_of_wasting_them_on_the_empty_middle():
    from netshrink.techniques.clustering import kmeans_1d

    torch.manual_seed(0)
    weights = torch.randn(40_000)
    survivors = weights[weights.abs() > weights.abs().quantile(0.9)]  # what 90% magnitude pruning leaves
    centroids, index = kmeans_1d(survivors, 16)
    assert torch.bincount(index, minlength=16).gt(0).sum() >= 14
    dense_centroids, dense_index = kmeans_1d(weights, 16)
    assert torch.bincount(dense_index, minlength=16).gt(0).sum() == 16
