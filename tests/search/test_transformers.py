"""Users' transformers through the whole path, as a user runs it: validate, baseline, every applicable technique,
the artifact, the ONNX export and its accuracy check. One model per style: PyTorch's own layers, and attention
written by hand as timm writes it. The built-in ViT's 24-trial search is ``slow`` (its figures are in docs/techniques/transformers.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]

MODELS = '''
import torch
from torch import nn


def torch_encoder(num_classes, input_shape):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(input_shape[-1], 24)
            layer = nn.TransformerEncoderLayer(24, 2, 48, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(24, num_classes)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x.reshape(x.shape[0], -1, x.shape[-1]))).mean(dim=1))

    return Model()


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(-1).matmul(v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, 4), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def timm_style(num_classes, input_shape):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(input_shape[-1], 32)
            self.blocks = nn.Sequential(Block(32), Block(32))
            self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, num_classes)

        def forward(self, x):
            return self.head(self.norm(self.blocks(self.embed(x.reshape(x.shape[0], -1, x.shape[-1])))).mean(dim=1))

    return Model()
'''

EXPERIMENT = """
name: {name}
task: {{dataset_args: {{image_size: 8}}, model: "usermodels:{name}", train: {{epochs: 8}}}}
finetune: {{epochs: 1}}
search: {{trials: 6, max_concurrent: 2, sampler: random, seed: 1, informed_start: false}}
measure: {{warmup: 5, repeats: 100}}
space:
  lowrank: {{rank_fraction: {{low: 0.2, high: 0.5}}}}
  early_exit: {{after: [{cut}]}}
  distillation: {{}}
  pruning: {{granularity: [weight, channel], ratio: {{low: 0.2, high: 0.5}}{heads}}}
  quantization: {{bits: [8, 4]}}
  clustering: {{clusters: [8, 16]}}
"""


def netshrink(*args, cwd):
    return subprocess.run([sys.executable, "-m", "netshrink.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=900)


@pytest.mark.parametrize(
    "name, cut, heads",
    [pytest.param("torch_encoder", "encoder.layers.0", "", marks=pytest.mark.slow), ("timm_style", "blocks.0", ", head_ratio: {low: 0.25, high: 0.5}")],
)
def test_a_users_transformer_goes_through_validate_search_export_and_the_onnx_check(name, cut, heads, tmp_path):
    (tmp_path / "usermodels.py").write_text(MODELS)
    (tmp_path / "exp.yaml").write_text(textwrap.dedent(EXPERIMENT.format(name=name, cut=cut, heads=heads)))
    validated = netshrink("validate", "exp.yaml", cwd=tmp_path)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    searched = netshrink("search", "exp.yaml", cwd=tmp_path)
    assert searched.returncode == 0, searched.stdout[-3000:] + searched.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [r for r in client.search_runs([client.get_experiment_by_name(name).experiment_id]) if r.data.tags["netshrink.role"] == "trial"]
    assert len(runs) >= 6 and not [r for r in runs if r.info.status == "FAILED"]  # stopped early is allowed, failed is not
    for run in runs:
        metrics = run.data.metrics
        assert abs(metrics["onnx_accuracy"] - metrics["accuracy"]) < 0.01  # the exported model computes what torch computed
        if name == "torch_encoder" and '"kind":"lowrank"' in run.data.tags["recipe"]:
            assert "reads its weight directly" in run.data.tags["notes"]  # linear1/linear2 left whole, and the run says so
    exported = netshrink("export", "-e", name, "--pick", "accuracy", "--out", "out", cwd=tmp_path)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert (tmp_path / "out" / "model.onnx").stat().st_size > 0


@pytest.mark.slow
def test_the_built_in_vit_search_over_every_applicable_technique(tmp_path):
    """24 trials, random sampler, every technique that applies to a transformer: none fails, and the front is printed."""
    shutil.copy(ROOT / "spaces" / "digits-vit.yaml", tmp_path / "exp.yaml")
    text = (tmp_path / "exp.yaml").read_text().replace("  trials: 32\n  sampler: nsga2\n", "  trials: 24\n  sampler: random\n")
    (tmp_path / "exp.yaml").write_text(text)
    result = netshrink("search", "exp.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Pareto front of 'digits-vit'" in result.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [r for r in client.search_runs([client.get_experiment_by_name("digits-vit").experiment_id]) if r.data.tags["netshrink.role"] == "trial"]
    assert len([r for r in runs if "refined_from" not in r.data.tags]) == 24
    assert not [r for r in runs if r.info.status == "FAILED"]
    kinds = {step for r in runs for step in __import__("json").loads(r.data.tags["recipe"])["steps"] for step in [step["kind"]]}
    assert kinds == {"lowrank", "early_exit", "distillation", "pruning", "quantization", "clustering"}
