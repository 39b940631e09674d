"""Why ``model.onnx`` and the artifact differ in size, in words, for the model card and the export's output.

What ships is the ONNX file, and the artifact is what the search measured (``size_bytes``); the two agree within
``CLOSE`` for dense weights at 8 bits, float16 or float32, where the ONNX file stores what the artifact stores.
Elsewhere the difference has causes the storage plan names, and this module names them.
"""

from __future__ import annotations

from netshrink.techniques import TensorEncoding

CLOSE = 0.10  # within 10% of the artifact's bytes: the same storage, give or take a graph and float32 scales


def size_note(encodings: dict[str, TensorEncoding], artifact_bytes: float, onnx_bytes: float) -> str | None:
    """None when the two sizes are within ``CLOSE`` of each other; else a sentence giving both and the reasons."""
    if abs(onnx_bytes - artifact_bytes) <= CLOSE * artifact_bytes:
        return None
    plans = list(encodings.values())
    reasons = []
    if any(plan.sparse for plan in plans):
        reasons.append(
            "pruned weights are stored dense in model.onnx (ONNX Runtime's CPU kernels are dense), and sparse in the artifact "
            "(a bitmask or gap codes and the nonzero values)"
        )
    if any(plan.bits in (1, 2) for plan in plans):
        reasons.append("1- and 2-bit codes take 4 bits each in model.onnx (ONNX INT4, its narrowest integer type) and their own width in the artifact")
    if any(plan.clusters is not None and plan.bits == 32 for plan in plans):
        huffman = any(plan.huffman for plan in plans)
        reasons.append(
            "clustered weights are indices into each layer's table in model.onnx, 4 bits wide for 16 values or fewer and 8 for more "
            "(ONNX has no narrower integers), and "
            + ("Huffman-coded indices" if huffman else "indices of log2(clusters) bits")
            + " in the artifact"
        )
    if onnx_bytes > artifact_bytes:
        reasons.append(
            "model.onnx also holds the graph (every operator and tensor name), float32 per-channel scales and biases "
            "(float16 in the artifact): on a small model, a large share"
        )
    else:
        reasons.append("the artifact holds the recipe and each tensor's storage plan in its header")
    return f"model.onnx is {onnx_bytes:,.0f} bytes and the artifact {artifact_bytes:,.0f} bytes ({onnx_bytes / artifact_bytes:.2f}x): " + "; ".join(reasons)
