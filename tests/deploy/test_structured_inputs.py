"""Batches of any usual structure, read one way by every consumer, and exported to ONNX under their own names and dtypes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from netshrink.deploy.measure import ort_session
from netshrink.deploy.onnx_export import export_onnx
from netshrink.tasks.batches import BatchError, BatchFormat
from netshrink.techniques.inputs import forward_logits, numpy_feed


class Bag(nn.Module):
    """Token ids and a mask in, a dict with logits out: no layer fixes the sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        weights = attention_mask.unsqueeze(-1).float()
        return {"logits": self.fc((self.embed(input_ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0))}


def sequences(lengths):
    generator = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(1, 30, (n,), generator=generator), "attention_mask": torch.ones(n, dtype=torch.long), "label": i % 3}
        for i, n in enumerate(lengths)
    ]


def test_dict_items_split_on_their_label_key_and_keep_integer_dtypes():
    items = sequences([4, 4, 4])
    batches = BatchFormat.resolve(items)
    assert batches.label_key == "label"  # 'labels' first, else 'label'
    inputs, target = batches.collated(items, [0, 1])
    assert set(inputs) == {"input_ids", "attention_mask"} and inputs["input_ids"].dtype == torch.int64 and target.tolist() == [0, 1]
    with pytest.raises(BatchError, match=r"task.label_key: 'y' is not a key of the batch; its keys: \['input_ids', 'attention_mask', 'label'\]"):
        BatchFormat.resolve(items, label_key="y")


def test_tuple_inputs_are_positional_and_named_input_0_input_1():
    items = [((torch.zeros(2), torch.ones(3)), 1)] * 2
    batches = BatchFormat.resolve(items)
    inputs, _ = batches.collated(items, [0, 1])
    assert isinstance(inputs, tuple) and [t.shape for t in inputs] == [(2, 2), (2, 3)]
    assert list(numpy_feed(inputs)) == ["input_0", "input_1"]
    with pytest.raises(BatchError, match="task.label_key: 'labels' is set, but items are \\(inputs, target\\) pairs"):
        BatchFormat.resolve(items, label_key="labels")
    with pytest.raises(BatchError, match="an item \\(after collation\\) is a list of 3 elements"):
        BatchFormat.resolve([(torch.zeros(2), torch.zeros(2), 1)])


def test_an_input_whose_length_varies_gets_a_sequence_axis_and_runs_at_any_length(tmp_path):
    items = sequences([5, 9, 7])
    batches = BatchFormat.resolve(items)
    assert batches.varying_axes(items) == {"input_ids": [1], "attention_mask": [1]}
    model = Bag().eval()
    path = tmp_path / "bag.onnx"
    export_onnx(model, batches.example(items), path, {}, batches.varying_axes(items))
    graph = onnx.load(str(path)).graph
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == [("input_ids", onnx.TensorProto.INT64), ("attention_mask", onnx.TensorProto.INT64)]
    session = ort_session(path)
    for index in range(len(items)):  # traced at length 5, run at 5, 9 and 7
        inputs, _ = batches.collated(items, [index])
        with torch.no_grad():
            expected = forward_logits(model, inputs).numpy()
        np.testing.assert_allclose(session.run(["logits"], numpy_feed(inputs))[0], expected, rtol=1e-5, atol=1e-6)
