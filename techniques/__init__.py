"""Compression techniques as plain PyTorch: no Ray, Optuna or MLflow in here."""

from .artifact import load_artifact, read_artifact, save_artifact
from .base import CompressionContext, Stage, Technique, TechniqueConfig
from .clustering import ClusteringConfig
from .distillation import DistillationConfig
from .encoding import TensorEncoding
from .lowrank import LowRankConfig
from .pipeline import Compressed, Pipeline, compress
from .pruning import PruningConfig
from .quantization import QuantizationConfig
from .registry import REGISTRY, exclusion, get_technique
from .separable import SeparableConfig

__all__ = [
    "REGISTRY",
    "ClusteringConfig",
    "Compressed",
    "CompressionContext",
    "DistillationConfig",
    "LowRankConfig",
    "Pipeline",
    "PruningConfig",
    "QuantizationConfig",
    "SeparableConfig",
    "Stage",
    "Technique",
    "TechniqueConfig",
    "TensorEncoding",
    "compress",
    "exclusion",
    "get_technique",
    "load_artifact",
    "read_artifact",
    "save_artifact",
]
