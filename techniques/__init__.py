"""Compression techniques as plain PyTorch: no Ray, Optuna or MLflow in here."""

from .artifact import load_artifact, read_artifact, save_artifact
from .base import CompressionContext, Stage, Technique, TechniqueConfig, all_outputs
from .clustering import ClusteringConfig
from .distillation import DistillationConfig
from .block_exits import BlockExitNet
from .early_exit import EarlyExitConfig, EarlyExitNet, exit_points, has_exits
from .encoding import TensorEncoding
from .lowrank import LowRankConfig
from .pipeline import Compressed, Pipeline, compress
from .pruning import PruningConfig
from .quantization import QuantizationConfig
from .registry import REGISTRY, exclusion
from .separable import SeparableConfig

__all__ = [
    "REGISTRY",
    "ClusteringConfig",
    "Compressed",
    "CompressionContext",
    "DistillationConfig",
    "EarlyExitConfig",
    "BlockExitNet",
    "EarlyExitNet",
    "has_exits",
    "LowRankConfig",
    "Pipeline",
    "PruningConfig",
    "QuantizationConfig",
    "SeparableConfig",
    "Stage",
    "Technique",
    "TechniqueConfig",
    "TensorEncoding",
    "all_outputs",
    "compress",
    "exclusion",
    "exit_points",
    "load_artifact",
    "read_artifact",
    "save_artifact",
]
