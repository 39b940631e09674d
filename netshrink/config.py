"""The experiment file: one YAML document, validated whole before anything expensive starts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from netshrink.errors import UserError, describe_validation_error
from netshrink.spaces import SearchSpace
from netshrink.yaml_file import DuplicateKeyError, read_yaml

# Direction of each metric a search can optimise; fixed, because e.g. minimising accuracy is never meant.
# onnx_bytes: the size of model.onnx, for users who ship the ONNX file (size_bytes is the artifact's)
OBJECTIVES: dict[str, Literal["max", "min"]] = {"accuracy": "max", "size_bytes": "min", "onnx_bytes": "min", "latency_ms": "min", "throughput": "max"}


def metric_name_of_any(name: str) -> str | None:
    """``name`` if it can be a metric's name at all (a built-in one), for objectives checked without a valid task section."""
    from netshrink.metrics import BUILTIN_METRICS

    return name if name in BUILTIN_METRICS else None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Optimisation(Strict):
    """How a model is trained: the settings real models need to be fine-tuned without damage. The defaults are
    netshrink's recipe before these settings existed (Adam at a constant rate), so the built-in task's figures hold."""

    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="torch.optim.Adam, AdamW or SGD")
    weight_decay: float = Field(0.0, ge=0, le=1, description="the optimizer's weight decay (decoupled for adamw)")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd: momentum (Nesterov off)")
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning rate over the run: constant, or cosine decay to 0 after the warm-up")
    warmup_epochs: float = Field(0.0, ge=0, le=10_000, description="linear warm-up from 0 to lr over this many epochs (fractions allowed)")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradients' global L2 norm to this value; default: no clipping")
    num_workers: int = Field(0, ge=0, le=256, description="data-loader worker processes (0: load in the training process)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16 or fp16: mixed precision (autocast, with gradient scaling for fp16) on CUDA; on the CPU netshrink trains in fp32 only"
    )


class TrainSettings(Optimisation):
    """How the baseline is trained (and cached: the same settings never train twice). ``epochs: 0``: the model as
    the factory (and ``task.weights``) gives it is the baseline, measured as it is."""

    epochs: int = Field(30, ge=0, le=10_000, description="training epochs of the baseline; 0: no training, the model as given is the baseline")
    lr: float = Field(1e-3, gt=0, le=1, description="learning rate")
    batch_size: int = Field(64, ge=1, description="training batch size")
    seed: int = Field(0, description="seed of the initialisation and the shuffling")


class FinetuneSettings(Optimisation):
    """How each trial fine-tunes its compressed model."""

    epochs: int = Field(3, ge=0, le=10_000, description="fine-tuning epochs of a trial")
    lr: float = Field(5e-4, gt=0, le=1, description="learning rate")
    batch_size: int = Field(64, ge=1, description="training batch size")


REFERENCE = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"


class TaskConfig(Strict):
    dataset: str = Field("digits", description="built-in name (digits) or 'package.module:factory' returning TaskData or (train, val, test) datasets")
    dataset_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the dataset factory")
    model: str = Field("lenet5", description="built-in name (lenet5, vit) or 'package.module:factory' returning a torch.nn.Module")
    model_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model factory")
    weights: str | None = Field(
        None,
        description="a state dict loaded into the factory's model: .pt/.pth (torch.save) or .safetensors; a relative path is taken "
        "from the experiment file's folder. With train.epochs: 0 the baseline is exactly this model",
    )
    label_key: str | None = Field(None, description="for dataset items that are dicts: the key of the target; default: 'labels', else 'label'")
    collate: str | None = Field(None, description="'package.module:fn' passed as collate_fn to every DataLoader; default: torch's")
    loss: str = Field("cross_entropy", description="training loss: cross_entropy, or 'package.module:fn(outputs, target) -> scalar tensor' (outputs: the logits)")
    metric: str = Field(
        "accuracy",
        description="what the search maximises, on a whole split: accuracy (top-1), top5, f1_macro, or 'package.module:fn(outputs, targets) -> float', "
        "higher is better; its name is what every table, plot and MLflow run shows",
    )
    allow_weak_baseline: bool = Field(
        False, description="search even when the baseline's validation metric is within 2 points of always answering the most frequent class"
    )
    train: TrainSettings = Field(default_factory=TrainSettings, description="how the baseline is trained")

    @field_validator("dataset", "model")
    @classmethod
    def _reference_shape(cls, value: str) -> str:
        if ":" in value and not re.fullmatch(REFERENCE, value):
            raise ValueError(f"must be a built-in name or 'package.module:factory', got {value!r}")
        return value

    @field_validator("collate")
    @classmethod
    def _function_reference(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(REFERENCE, value):
            raise ValueError(f"must be 'package.module:function', got {value!r}")
        return value

    @field_validator("loss")
    @classmethod
    def _loss(cls, value: str) -> str:
        if value != "cross_entropy" and not re.fullmatch(REFERENCE, value):
            raise ValueError(f"must be cross_entropy or 'package.module:function', got {value!r}")
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        from netshrink.metrics import BUILTIN_METRICS

        if value not in BUILTIN_METRICS and not re.fullmatch(REFERENCE, value):
            raise ValueError(f"must be one of {', '.join(BUILTIN_METRICS)} or 'package.module:function', got {value!r}")
        if ":" in value and value.rpartition(":")[2] in (*OBJECTIVES, *BUILTIN_METRICS):
            raise ValueError(f"{value!r}: the function's name is what the metric is shown as, and {value.rpartition(':')[2]!r} is taken")
        return value

    @property
    def metric_name(self) -> str:
        from netshrink.metrics import metric_name

        return metric_name(self.metric)


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


# ``multi_fidelity: auto`` (the default) turns successive halving on where its ladder has at least this many rungs.
# Measured by benchmarks/search_quality.py (2026-12-07, docs/benchmarks.md, "Around time"): with two rungs (1 and 3 epochs, the presets'
# 3-epoch fine-tuning) it paid on none of the three models: useful hypervolume 0.786 against 0.872 on LeNet-5, 0.120
# against 0.147 on a residual CNN, 0.184 against 0.210 on the built-in ViT (3 seeds each); a transformer one epoch into
# its fine-tuning ranks unlike where it ends, and each rung adds a measurement.
MIN_AUTO_RUNGS = 3


class MultiFidelity(Strict):
    """Multi-objective successive halving over fine-tuning (``search/moasha.py``). A trial is measured in full after
    ``min_epochs``, ``min_epochs x reduction_factor``, ... epochs of fine-tuning, up to ``finetune.epochs``; at each
    rung the top ``1 / reduction_factor`` of the trials measured there so far go on from where they stand, the rest
    stop with that rung's figures. With ``finetune.epochs`` at or under ``min_epochs`` there is a single rung."""

    enabled: bool | Literal["auto"] = Field(
        "auto",
        description="false: every trial fine-tunes finetune.epochs and is measured once, at the end; auto: on where the ladder has "
        f"at least {MIN_AUTO_RUNGS} rungs (finetune.epochs of 9 or more with the defaults: 1, 3, 9)",
    )
    min_epochs: int = Field(1, ge=1, le=10_000, description="the first rung: epochs of fine-tuning before a trial is first measured and ranked")
    reduction_factor: float = Field(3.0, gt=1, le=100, description="the share of trials a rung promotes is 1 / reduction_factor")
    rungs: list[int] | None = Field(
        None, description="the rung epochs written out, increasing, the last at most finetune.epochs (which is always the last rung); "
        "default: min_epochs x reduction_factor^k"
    )

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(b <= a for a, b in zip(value, value[1:])) or value[0] < 1):
            raise ValueError("must be a non-empty list of increasing whole epochs, each at least 1")
        return value

    def epochs(self, finetune_epochs: int) -> tuple[int, ...]:
        """The rung epochs for trials of ``finetune_epochs``: () when off, when there is a single rung, or under ``auto``
        when there are fewer than ``MIN_AUTO_RUNGS``."""
        if self.enabled is False or finetune_epochs <= 0:
            return ()
        ladder = self._ladder(finetune_epochs)
        if self.enabled == "auto" and self.rungs is None and len(ladder) < MIN_AUTO_RUNGS:
            return ()  # rungs written out: the user asks for them
        return ladder

    def _ladder(self, finetune_epochs: int) -> tuple[int, ...]:
        if self.rungs is not None:
            rungs = [epochs for epochs in self.rungs if epochs < finetune_epochs]
        else:
            rungs, epochs = [], float(self.min_epochs)
            while round(epochs) < finetune_epochs:
                if not rungs or round(epochs) > rungs[-1]:
                    rungs.append(int(round(epochs)))
                epochs *= self.reduction_factor
        return (*rungs, finetune_epochs) if rungs else ()


class TimeBudget(Strict):
    """A wall-clock budget for the trials and the refinement: give minutes or hours."""

    minutes: float | None = Field(None, gt=0, le=10_000_000, description="the search's wall-clock budget in minutes")
    hours: float | None = Field(None, gt=0, le=100_000, description="the search's wall-clock budget in hours")
    trials: int | None = Field(None, ge=1, le=100_000, description="also stop after this many trials (the same as search.trials)")

    @model_validator(mode="after")
    def _one_unit(self) -> "TimeBudget":
        if (self.minutes is None) == (self.hours is None):
            raise ValueError("give the time as minutes or as hours (one of them), e.g. {minutes: 30}")
        return self

    @property
    def seconds(self) -> float:
        return 60.0 * self.minutes if self.minutes is not None else 3600.0 * self.hours


DEFAULT_TRIALS = 32  # search.trials when neither it nor a time budget is given


class SearchSettings(Strict):
    trials: int | None = Field(
        None, ge=1, le=100_000, description=f"trials to run; default {DEFAULT_TRIALS}, or as many as search.budget's time allows when it gives one"
    )
    budget: TimeBudget | None = Field(
        None, description="a wall-clock limit ({minutes: M} or {hours: H}) beside or instead of trials: no trial starts that the time "
        "left cannot fit at the measured pace, and time is kept for refinement"
    )
    multi_fidelity: MultiFidelity = Field(default_factory=MultiFidelity, description="true, false, or its settings: successive halving over fine-tuning")
    max_concurrent: int = Field(2, ge=1, description="trials running at once (each reserves resources.cpu and resources.gpu)")
    sampler: Literal["tpe", "nsga2", "gp", "botorch", "random"] = Field(
        "tpe",
        description="Optuna's multi-objective sampler: tpe (multivariate TPE, Optuna 5's default), nsga2, gp (GPSampler, logEHVI), "
        "botorch (BoTorch's qLogNEHVI through optuna-integration: pip install 'netshrink[botorch]'; tens of seconds a suggestion on "
        "2 CPU cores, worth it only when a trial takes far longer), or random; every one reads the trials' constraint values. "
        "Measured on three models, none leads TPE on all of them by more than its spread (docs/benchmarks.md, Around time)",
    )
    population_size: int = Field(8, ge=2, description="NSGA-II generation size")
    seed: int = Field(0, description="seed of the sampler and of the trials' fine-tuning (with trials running at once, the order they finish in can still differ between runs)")
    skip_repeats: bool = Field(True, description="a pipeline already evaluated in this search is not trained again")
    early_stopping: bool = Field(True, description="stop a trial whose validation accuracy during fine-tuning shows it cannot reach min_accuracy")
    informed_start: bool = Field(
        True, description="the first trials are the informed start (spaces/start.py): each technique alone, then combinations known to work"
    )
    max_failures: int = Field(1, ge=0, description="times a failed trial is run again (a worker process that died, an error) before it counts as failed")

    @field_validator("multi_fidelity", mode="before", json_schema_input_type=bool | Literal["auto"] | MultiFidelity)
    @classmethod
    def _switch(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) or value == "auto" else value

    @model_validator(mode="after")
    def _trials_once(self) -> "SearchSettings":
        if self.budget is not None and self.budget.trials is not None and self.trials is not None and self.budget.trials != self.trials:
            raise ValueError(f"budget.trials ({self.budget.trials}) and trials ({self.trials}) differ; give the trial count once")
        return self

    @property
    def trial_budget(self) -> int | None:
        """The most trials to run: None when only time limits the search."""
        given = self.trials if self.trials is not None else (self.budget.trials if self.budget is not None else None)
        if given is not None:
            return given
        return None if self.budget is not None else DEFAULT_TRIALS

    @property
    def seconds(self) -> float | None:
        return self.budget.seconds if self.budget is not None else None


class Resources(Strict):
    """Per trial; fractions are allowed (e.g. gpu: 0.25 puts four trials on one card)."""

    cpu: float = Field(1.0, gt=0, description="CPU cores Ray reserves for each trial")
    gpu: float = Field(0.0, ge=0, description="GPUs Ray reserves for each trial (0.25: four trials share a card); 0: trials run on the CPU")


class TrackingSettings(Strict):
    """How long a search waits for an MLflow tracking server that stops answering."""

    timeout_s: float = Field(
        180.0, gt=0, le=86400,
        description="seconds a tracking server may stay unreachable: calls are retried (the progress says so) until then, and then "
        "the search stops, its finished trials kept, with the command that resumes it",
    )


class MeasureSettings(Strict):
    """Latency: ``repeats`` batch-1 runs on ONNX Runtime CPU after ``warmup`` runs; throughput: batches of
    ``batch_size``. A trial's model is timed in alternation with the baseline, in the ONNX Runtime session
    options its deployment uses (see ``netshrink.deploy.measure``)."""

    threads: int = Field(1, ge=1, le=256, description="ONNX Runtime's intra-op threads for every measurement")
    warmup: int = Field(100, ge=0, description="untimed batch-1 runs before timing")
    repeats: int = Field(2000, ge=10, description="timed batch-1 runs, in 40 rounds alternating with the baseline")
    batch_size: int = Field(32, ge=1, le=4096, description="samples per call for the throughput objective")


class Experiment(Strict):
    name: str = Field(description="MLflow experiment name")
    task: TaskConfig = Field(default_factory=TaskConfig, description="the dataset, the model (built-in or your own module:factory), its weights, loss and metric")
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings, description="each trial's fine-tuning after compression")
    refine: RefineSettings = Field(default_factory=RefineSettings, description="after the trials, longer fine-tuning of the front points with most to gain")
    objectives: list[str] | None = Field(
        None,
        description="what the search optimises: the task's metric (by its name, e.g. accuracy or f1_macro), size_bytes, latency_ms, "
        "throughput (samples/s at measure.batch_size), onnx_bytes (model.onnx's size, for who ships it, instead of "
        "size_bytes, the artifact's); default: [metric, size_bytes, latency_ms]",
    )
    min_metric: float | None = Field(None, description="validation metric a model must reach to count (a constraint, absolute); default: none")
    max_metric_drop: float | None = Field(
        None, ge=0, description="largest drop of the validation metric below the baseline's a model may have to count (0.05: 5 points); "
        "default: 0.05 when min_metric is not given"
    )
    min_accuracy: float | None = Field(
        None, gt=0, le=1, description="deprecated: min_metric for a task whose metric is accuracy (the same rule)"
    )
    max_size_bytes: float | None = Field(None, gt=0, description="largest artifact a model may have to count (a constraint); default: none")
    max_latency_ms: float | None = Field(None, gt=0, description="largest latency a model may have to count (a constraint); default: none")
    search: SearchSettings = Field(default_factory=SearchSettings, description="the budget (trials, time), the sampler and how trials are scheduled")
    resources: Resources = Field(default_factory=Resources, description="what each trial reserves on the Ray cluster")
    measure: MeasureSettings = Field(default_factory=MeasureSettings, description="how latency and throughput are measured (ONNX Runtime, CPU)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: sqlite mlflow.db in the working directory")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="how long a search waits for an MLflow tracking server that stops answering")
    space: SearchSpace = Field(description="techniques to search and the ranges of their knobs")  # type: ignore[valid-type]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\- ]{0,127}", value):
            raise ValueError("must start with a letter or digit and use only letters, digits, space, '_', '-', '.'")
        return value

    @model_validator(mode="after")
    def _space_not_empty(self) -> "Experiment":
        if not self.space.techniques():
            raise ValueError("space: lists no technique; add at least one (e.g. pruning:)")
        return self

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        task = info.data.get("task")
        metric = task.metric_name if isinstance(task, TaskConfig) else None  # None: the task section has problems of its own
        known = [metric or "accuracy", *(name for name in OBJECTIVES if name != "accuracy")]
        unknown = [name for name in value if name not in known and (metric is not None or name != metric_name_of_any(name))]
        if unknown:
            hint = f" (this task's metric is {metric!r}: name it instead)" if metric and "accuracy" in unknown else ""
            raise ValueError(f"unknown objective(s) {unknown}{hint}; choose from {known}")
        if len(set(value)) != len(value) or not value:
            raise ValueError("list each objective once, at least one")
        return value

    @model_validator(mode="after")
    def _default_objectives(self) -> "Experiment":
        if self.objectives is None:
            object.__setattr__(self, "objectives", [self.task.metric_name, "size_bytes", "latency_ms"])
        return self

    @model_validator(mode="after")
    def _metric_floor(self) -> "Experiment":
        if self.min_accuracy is None:
            return self
        if self.task.metric_name != "accuracy":
            raise ValueError(f"min_accuracy: this task's metric is {self.task.metric_name!r}, not accuracy; use min_metric")
        if self.min_metric is not None:
            raise ValueError("min_accuracy: deprecated name of min_metric; give min_metric only")
        object.__setattr__(self, "min_metric", self.min_accuracy)
        return self

    @model_validator(mode="after")
    def _precision(self) -> "Experiment":
        for section, settings in (("task.train", self.task.train), ("finetune", self.finetune)):
            if settings.precision != "fp32" and self.resources.gpu <= 0:
                raise ValueError(
                    f"{section}.precision: {settings.precision} is mixed precision on CUDA, and resources.gpu is 0 (trials train on the CPU, "
                    "where netshrink trains in fp32 only); set resources.gpu or precision: fp32"
                )
        return self

    def rungs(self) -> tuple[int, ...]:
        """The rung epochs of this search's trials (``MultiFidelity.epochs``): () for a single measurement at the end."""
        return self.search.multi_fidelity.epochs(self.finetune.epochs)

    def directions(self) -> list[str]:
        return [self.direction(name) for name in self.objectives]

    def direction(self, objective: str) -> str:
        return "max" if objective == self.task.metric_name else OBJECTIVES[objective]

    @property
    def metric(self) -> str:
        """The name of the task's metric (``accuracy`` by default)."""
        return self.task.metric_name

    def notes(self) -> list[str]:
        """Deprecations the file uses, for the CLI to print."""
        if self.min_accuracy is not None:
            return ["min_accuracy is deprecated: write min_metric (the same rule, for any task.metric)"]
        return []


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file's keys and rules; every problem is reported at once as a ``UserError``.

    This runs no user code: ``netshrink.validation.load_experiment`` also builds the task.
    """
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
        return Experiment.model_validate(raw)
    except ValidationError as error:
        raise UserError(describe_validation_error(error), title=f"{path}: invalid experiment file") from None


SCHEMA_FILE = "experiment.schema.json"  # beside the presets (spaces/) and in the docs site


def json_schema() -> dict[str, Any]:
    """The experiment file's JSON Schema (draft 2020-12), generated from these models: every key with its type,
    default, bounds and description, and each knob's three forms (a value, a list of choices, a range)."""
    from netshrink import __version__

    generated = Experiment.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"netshrink experiment file (netshrink {__version__})",
        "description": "One search: the task, the search space of compression techniques, the objectives and the budget. "
        "Generated by `netshrink schema` from netshrink/config.py; `netshrink validate FILE` checks what a schema cannot.",
        **{key: value for key, value in generated.items() if key != "title"},
    }
