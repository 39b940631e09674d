"""The experiment file: one YAML document, validated whole before anything expensive starts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from netshrink.errors import UserError, describe_validation_error
from netshrink.spaces import SearchSpace
from netshrink.yaml_file import DuplicateKeyError, read_yaml

# Direction of each metric a search can optimise; fixed, because e.g. minimising accuracy is never meant.
OBJECTIVES: dict[str, Literal["max", "min"]] = {"accuracy": "max", "size_bytes": "min", "latency_ms": "min", "throughput": "max"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainSettings(Strict):
    """How the baseline is trained (and cached: the same settings never train twice)."""

    epochs: int = Field(30, ge=1, le=10_000)
    lr: float = Field(1e-3, gt=0, le=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 0


class FinetuneSettings(Strict):
    """How each trial fine-tunes its compressed model."""

    epochs: int = Field(3, ge=0, le=10_000)
    lr: float = Field(5e-4, gt=0, le=1)
    batch_size: int = Field(64, ge=1)


class TaskConfig(Strict):
    dataset: str = Field("digits", description="built-in name (digits) or 'package.module:factory'")
    dataset_args: dict[str, Any] = Field(default_factory=dict)
    model: str = Field("lenet5", description="built-in name (lenet5) or 'package.module:factory'")
    model_args: dict[str, Any] = Field(default_factory=dict)
    train: TrainSettings = Field(default_factory=TrainSettings)

    @field_validator("dataset", "model")
    @classmethod
    def _reference_shape(cls, value: str) -> str:
        if ":" in value and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError(f"must be a built-in name or 'package.module:factory', got {value!r}")
        return value


class RefineSettings(Strict):
    """After the search, fine-tune the front's most useful points longer and measure them again.

    A few epochs rank trials; a model that ships deserves more. Each refined point
    replays its trial's recipe on the baseline with ``epochs`` of fine-tuning and
    becomes a child run of its own (``refined_from`` names the trial); the front
    is then taken over trials and refined runs together.
    """

    epochs: int = Field(0, ge=0, le=10_000, description="fine-tuning epochs of a refined point; 0: no refinement")
    lr: float | None = Field(None, gt=0, le=1, description="its learning rate; default: finetune.lr")
    points: Literal["all", "above_min_accuracy", "knee", "potential"] = Field(
        "potential",
        description="which points: all of the front, the front at min_accuracy or above, the `count` front points nearest the knee, "
        "or the `count` trials at min_accuracy or above (or within `reach` of it) with the most hypervolume to gain if refinement brought "
        "them to the baseline's accuracy",
    )
    count: int = Field(4, ge=1, description="points: knee or potential: how many")
    reach: float = Field(
        0.05, ge=0, le=1,
        description="points: potential: trials up to this far under min_accuracy (0.05 = 5 points) are candidates too, since a few "
        "epochs of fine-tuning under-rank aggressive compression; every other constraint still holds",
    )


class SearchSettings(Strict):
    trials: int = Field(32, ge=1, le=100_000)
    max_concurrent: int = Field(2, ge=1)
    sampler: Literal["nsga2", "tpe", "random"] = "nsga2"
    population_size: int = Field(8, ge=2, description="NSGA-II generation size")
    seed: int = 0
    skip_repeats: bool = Field(True, description="a pipeline already evaluated in this search is not trained again")
    early_stopping: bool = Field(True, description="stop a trial whose validation accuracy during fine-tuning shows it cannot reach min_accuracy")
    informed_start: bool = Field(
        True, description="the first trials are the informed start (spaces/start.py): each technique alone, then combinations known to work"
    )
    max_failures: int = Field(1, ge=0, description="times a failed trial is run again (a worker process that died, an error) before it counts as failed")


class Resources(Strict):
    """Per trial; fractions are allowed (e.g. gpu: 0.25 puts four trials on one card)."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class MeasureSettings(Strict):
    """Latency: ``repeats`` batch-1 runs on ONNX Runtime CPU after ``warmup`` runs; throughput: batches of
    ``batch_size``. A trial's model is timed in alternation with the baseline, in the ONNX Runtime session
    options its deployment uses (see ``netshrink.deploy.measure``)."""

    threads: int = Field(1, ge=1, le=256, description="ONNX Runtime's intra-op threads for every measurement")
    warmup: int = Field(100, ge=0)
    repeats: int = Field(2000, ge=10)
    batch_size: int = Field(32, ge=1, le=4096, description="samples per call for the throughput objective")


class Experiment(Strict):
    name: str = Field(description="MLflow experiment name")
    task: TaskConfig = Field(default_factory=TaskConfig)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    refine: RefineSettings = Field(default_factory=RefineSettings)
    objectives: list[str] = Field(
        default_factory=lambda: ["accuracy", "size_bytes", "latency_ms"],
        description="what the search optimises (accuracy, size_bytes, latency_ms; throughput: samples/s at measure.batch_size)",
    )
    min_accuracy: float | None = Field(
        None, gt=0, le=1, description="validation accuracy a model must reach to count (a constraint); default: the baseline's minus 5 points"
    )
    max_size_bytes: float | None = Field(None, gt=0, description="largest artifact a model may have to count (a constraint); default: none")
    max_latency_ms: float | None = Field(None, gt=0, description="largest latency a model may have to count (a constraint); default: none")
    search: SearchSettings = Field(default_factory=SearchSettings)
    resources: Resources = Field(default_factory=Resources)
    measure: MeasureSettings = Field(default_factory=MeasureSettings)
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: sqlite mlflow.db in the working directory")
    space: SearchSpace = Field(description="techniques to search and the ranges of their knobs")  # type: ignore[valid-type]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\- ]{0,127}", value):
            raise ValueError("must start with a letter or digit and use only letters, digits, space, '_', '-', '.'")
        return value

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in OBJECTIVES]
        if unknown:
            raise ValueError(f"unknown objective(s) {unknown}; choose from {list(OBJECTIVES)}")
        if len(set(value)) != len(value) or not value:
            raise ValueError("list each objective once, at least one")
        return value

    @model_validator(mode="after")
    def _space_not_empty(self) -> "Experiment":
        if not self.space.techniques():
            raise ValueError("space: lists no technique; add at least one (e.g. pruning:)")
        return self

    def directions(self) -> list[str]:
        return [OBJECTIVES[name] for name in self.objectives]


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; every problem is reported at once as a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment file {str(path)!r} not found")
    try:
        raw = read_yaml(path.read_text())
    except DuplicateKeyError as error:
        raise UserError(error.problems, title=f"{path}: invalid experiment file") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: must be a YAML mapping with at least 'name' and 'space'")
    try:
        experiment = Experiment.model_validate(raw)
    except ValidationError as error:
        raise UserError(describe_validation_error(error), title=f"{path}: invalid experiment file") from None
    check_task(experiment, search_path=str(path.resolve().parent))
    return experiment


def check_task(experiment: Experiment, search_path: str) -> None:
    """Import ``module:factory`` references and build the task once: data, model, one forward pass, one ONNX export.

    Cheap next to a search (seconds), and it turns a typo, a model that does not fit
    the data or one that ONNX cannot carry into a clear message before Ray starts
    and before the baseline trains.
    """
    import torch

    from netshrink.tasks import BUILTIN_DATASETS, BUILTIN_MODELS, build_model, example_inputs, load_data, resolve_factory

    task = experiment.task
    problems = []
    for field, builtins in (("dataset", BUILTIN_DATASETS), ("model", BUILTIN_MODELS)):
        try:
            resolve_factory(getattr(task, field), builtins, search_path)
        except ValueError as error:
            problems.append(f"task.{field}: {error}")
    if problems:
        raise UserError(problems, title="invalid experiment file")
    try:
        data = load_data(task.dataset, task.dataset_args, search_path)
    except Exception as error:  # user code or user arguments
        raise UserError(f"task.dataset_args: building dataset {task.dataset!r} failed: {type(error).__name__}: {error}") from None
    try:
        model = build_model(task.model, task.model_args, data, search_path)
        with torch.no_grad():
            model.eval()(example_inputs(data, batch=2))
    except Exception as error:
        raise UserError(
            f"task.model: model {task.model!r} does not run on {task.dataset!r} inputs of shape "
            f"{tuple(data.input_shape)}: {type(error).__name__}: {error}"
        ) from None
    from netshrink.deploy.onnx_export import check_exportable

    try:
        check_exportable(model, example_inputs(data))
    except ValueError as error:
        raise UserError(f"task.model: model {task.model!r}: {error}") from None
    check_exit_points(experiment, model)
    check_layer_names(experiment, model)
    check_space_on_model(experiment, model, example_inputs(data))


def check_space_on_model(experiment: Experiment, model, example) -> None:
    """Every technique the space may switch on can act on this model, and pipelines of the space run and export
    (``spaces.probe``): a pipeline that would break the model's shapes fails here, in seconds, not in a trial."""
    from netshrink.spaces.probe import probe

    problems = probe(experiment.space, model, example)
    if problems:
        raise UserError(problems, title=f"the space does not fit model {experiment.task.model!r}")


def check_layer_names(experiment: Experiment, model) -> None:
    """Every layer a per-layer map names (``pruning.layer_ratios``, ``quantization.layer_bits``, ...) is one the technique acts on."""
    from netshrink.spaces.knobs import Fixed
    from netshrink.techniques import REGISTRY
    from netshrink.techniques.base import compressible_weights, is_per_layer_field, module_of

    layers = [module_of(name) for name in compressible_weights(model)]
    problems = []
    for kind, space in experiment.space.techniques().items():
        for field, knob in space.knobs().items():
            if is_per_layer_field(REGISTRY[kind].config_type, field) and isinstance(knob, Fixed) and knob.value:
                unknown = [name for name in knob.value if name not in layers]
                if unknown:
                    problems.append(
                        f"space.{kind}.{field}: {', '.join(map(repr, unknown))} is not a layer of model {experiment.task.model!r} "
                        f"that {kind} acts on; its layers: {', '.join(layers)}"
                    )
    if problems:
        raise UserError(problems, title="invalid experiment file")


def check_exit_points(experiment: Experiment, model) -> None:
    """Every placement the space may give early exits names a cut point of this model."""
    from netshrink.spaces.knobs import Choice, Fixed
    from netshrink.techniques import EarlyExitConfig, exit_points

    space = experiment.space.techniques().get("early_exit")
    if space is None or space.enabled is False:
        return
    try:
        available = exit_points(model)
    except ValueError as error:
        raise UserError(f"space.early_exit: model {experiment.task.model!r}: {error}") from None
    knob = space.after
    placements = [knob.value] if isinstance(knob, Fixed) else list(knob.options) if isinstance(knob, Choice) else []
    for placement in placements:
        names = EarlyExitConfig(after=placement).after
        unknown = [name for name in names if name not in available]
        if unknown:
            raise UserError(
                f"space.early_exit.after: {'+'.join(unknown)!r} is not a cut point of model {experiment.task.model!r}; "
                f"its cut points, in forward order: {', '.join(available)}"
            )


def task_exit_points(experiment: Experiment, search_path: str) -> list[str]:
    """The names ``space.early_exit.after`` may use for this experiment's model."""
    from netshrink.tasks import build_model, load_data
    from netshrink.techniques import exit_points

    task = experiment.task
    return exit_points(build_model(task.model, task.model_args, load_data(task.dataset, task.dataset_args, search_path), search_path))
