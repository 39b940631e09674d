import numpy as np
import onnxruntime as ort
import torch

from textcls import balanced_accuracy, pad, sentences

options = ort.SessionOptions()
options.add_session_config_entry("session.disable_quant_qdq", "1")  # as MODEL_CARD.md says
session = ort.InferenceSession("shipped/model.onnx", options, providers=["CPUExecutionProvider"])
print([(i.name, i.type, i.shape) for i in session.get_inputs()])
val = sentences()[1]
logits, labels = [], []
for index in range(len(val)):
    batch = pad([val[index]])
    feed = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
    logits.append(session.run(["logits"], feed)[0])
    labels.append(int(batch["labels"]))
print(f"balanced_accuracy of model.onnx on the validation split: {balanced_accuracy(torch.from_numpy(np.concatenate(logits)), torch.tensor(labels)):.4f}")
