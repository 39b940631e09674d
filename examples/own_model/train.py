"""Train the example's text classifier as a user would, before netshrink: writes trained.safetensors."""

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from textcls import balanced_accuracy, pad, sentences, text_classifier

torch.manual_seed(0)
train, val, _ = sentences()
model = text_classifier()
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
for epoch in range(12):
    model.train()
    for batch in DataLoader(train, batch_size=32, shuffle=True, collate_fn=pad):
        labels = batch.pop("labels")
        loss = torch.nn.functional.cross_entropy(model(**batch)["logits"], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
model.eval()
with torch.no_grad():
    batch = pad([val[i] for i in range(len(val))])
    labels = batch.pop("labels")
    print(f"validation balanced accuracy {balanced_accuracy(model(**batch)['logits'], labels):.4f}")
save_file(model.state_dict(), Path(__file__).with_name("trained.safetensors"))
