"""The contract every compression technique implements.

A technique is a frozen pydantic config (what to do) plus a handler (how to do
it), in the style of torchao's ``quantize_(model, Config())``. Handlers mutate
a model that the pipeline has already copied; they never see the caller's model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn.utils import parametrize

from .encoding import TensorEncoding, to_half_grid
from .inputs import ExitLogits, Inputs, WidthLogits, call, logits_of


class Stage(IntEnum):
    """Where a technique sits in a pipeline: architecture -> early exits or widths -> distillation -> pruning -> quantization."""

    ARCHITECTURE = 0
    DYNAMIC = 1  # early exits or slimmable widths attach to the final architecture; everything after trains and compresses them too
    DISTILLATION = 2
    PRUNING = 3
    QUANTIZATION = 4


ORDER = "architecture -> early exits or widths -> distillation -> pruning -> quantization"


# ``Field(json_schema_extra=APPLIED)`` marks a field that the technique fills in when it applies (the layers
# and ranks it chose from the model's shapes): recorded in the recipe so a replay builds the same model, never
# a search knob. Left empty, the technique decides from its other fields.
APPLIED = {"applied": True}


def is_applied_field(config_type: type[BaseModel], name: str) -> bool:
    extra = config_type.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and extra.get("applied") is True


# ``Field(json_schema_extra=PER_LAYER)`` marks a map from layer (module) name to a value, written in the
# experiment file as one fixed value (``layer_bits: {conv1: 8, fc1: 4}``) so that a published recipe can be
# written down as published; validation checks the names against the model.
PER_LAYER = {"per_layer": True}


# ``Field(json_schema_extra=QUIET)`` marks a setting that is no search knob and is shown in one-line summaries only
# when it differs from its default (channel pruning's ``round_to``).
QUIET = {"quiet": True}


def is_quiet_field(config_type: type[BaseModel], name: str) -> bool:
    extra = config_type.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and extra.get("quiet") is True


def is_per_layer_field(config_type: type[BaseModel], name: str) -> bool:
    extra = config_type.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and extra.get("per_layer") is True


def per_layer(layers: dict[str, nn.Module], values: dict[str, Any] | None, default: Any, field: str) -> dict[str, Any]:
    """``layers``' parameter names -> their value: from ``values`` (by module name) where listed, else ``default``.

    ``ValueError`` naming ``field`` and the layer when ``values`` names a module that is not among ``layers``.
    """
    values = values or {}
    modules = {module_of(name): name for name in layers}
    unknown = [name for name in values if name not in modules]
    if unknown:
        raise ValueError(f"{field}: {', '.join(map(repr, unknown))} is not a compressible layer of this model; its layers: {', '.join(modules)}")
    return {parameter: values.get(module, default) for module, parameter in modules.items()}


class TechniqueConfig(BaseModel):
    """Base of every technique config: immutable, unknown keys rejected, versioned.

    ``VERSION`` is the version of the technique's rules for applying and rebuilding a model
    from its config (torchao's ``AOBaseConfig.VERSION``): bump it when they change, so that a
    recipe written under the old rules is refused by name instead of replayed into another
    model. Every step of a recipe carries it (``version``); a config made in code gets the
    current one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    VERSION: ClassVar[int] = 1

    kind: str
    version: int = Field(0, description="the version of the technique's rules the step was written under (0: the current one)")

    @model_validator(mode="after")
    def _current_version(self) -> "TechniqueConfig":
        if self.version == 0:
            object.__setattr__(self, "version", type(self).VERSION)
        elif self.version != type(self).VERSION:
            raise ValueError(
                f"{self.kind} version {self.version}: this step was written under version {self.version} of {self.kind}'s rules, and this "
                f"netshrink applies version {type(self).VERSION}; replaying it would build another model. Run the search again with "
                "this netshrink, or use the netshrink that wrote it"
            )
        return self

    def is_noop(self) -> bool:
        """True when this config leaves the model as it is (e.g. 32-bit quantization)."""
        return False


LossFn = Callable[[Any, Any, Inputs], torch.Tensor]  # (logits, targets, model inputs) -> loss
FineTune = Callable[[nn.Module, "LossFn | None"], None]  # (model, loss or None for cross-entropy)


@dataclass
class CompressionContext:
    """What a handler may use besides the model and its config.

    ``encodings`` is the storage plan: parameter name -> how the artifact stores
    it. Handlers update it; the artifact writer and the size accounting read it.
    """

    example_inputs: Inputs  # real samples of the task, in the structure and dtypes the model takes (``inputs``)
    encodings: dict[str, TensorEncoding]
    protected_modules: frozenset[str] = frozenset()
    fine_tune: FineTune | None = None
    seed: int = 0
    teacher: nn.Module | None = None  # the caller's model, untouched: distillation's teacher
    loss_fn: LossFn | None = None  # set by a technique that changes the training objective; None: ``task_loss``
    task_loss: LossFn | None = None  # the task's own loss (the user's ``task.loss``); None: cross-entropy
    sensitivity: dict | None = None  # the baseline's per-layer sensitivity (``sensitivity.measure_sensitivity``)
    calibration_inputs: Inputs | None = None  # training samples that calibrate activation ranges (static int8)
    notes: list[str] = field(default_factory=list)  # what a technique left out and why (a layer it cannot treat), for the log
    decided: dict[str, Any] = field(default_factory=dict)  # kind -> what it decided while applying, for its ``record``


class Technique:
    """The contract of a registered technique, with its defaults: subclass it, set ``config_type`` and
    ``stage``, implement ``apply``, and override what the technique needs (torchao's registered
    config handlers, Optuna's ``BaseSampler``). ``kind`` is taken from the config type's ``kind``.

    Adding a technique is one module (its config and its ``Technique`` subclass) and one line in
    ``registry.py``; the contract tests then run it through every check.
    """

    config_type: ClassVar[type[TechniqueConfig]]
    stage: ClassVar[Stage]
    kind: ClassVar[str]  # set from ``config_type`` for every subclass
    # the space a search draws the technique's knobs from when the experiment file names none
    default_space: ClassVar[dict[str, Any]] = {}
    # knob -> {other knob: value}: the knob means something (and is asked) only when the others have these values
    conditions: ClassVar[dict[str, dict[str, Any]]] = {}
    # kinds that must not be active in the same pipeline (either side may declare it), and why
    excludes: ClassVar[frozenset[str]] = frozenset()
    exclusion_reason: ClassVar[str] = ""
    # False for a technique that makes a model neither smaller nor faster by itself (distillation): the space
    # never samples a pipeline of such techniques alone
    compresses: ClassVar[bool] = True
    # one line, what it does and what it saves: the experiment file's reference and the schema describe it by this
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_type" in cls.__dict__:
            cls.kind = cls.config_type.model_fields["kind"].default

    def apply(self, model: nn.Module, config: TechniqueConfig, ctx: CompressionContext) -> nn.Module | None:
        """Transform ``model`` in place and record the storage plan in ``ctx.encodings``.

        A technique that wraps the model (early exits) returns the new model, which
        replaces ``model`` for the rest of the pipeline; others return None.
        """
        raise NotImplementedError

    def resolve(self, model: nn.Module, config: TechniqueConfig, ctx: CompressionContext) -> TechniqueConfig:
        """The config with the decisions taken from the model before applying written out (``APPLIED`` fields:
        which layers, which ranks), so the recipe says what was done and a replay on another netshrink
        version builds the same model or fails naming the layer it cannot find."""
        return config

    def record(self, model: nn.Module, config: TechniqueConfig, ctx: CompressionContext) -> TechniqueConfig:
        """The config with the decisions known only once applied written out (the heads channel pruning kept)."""
        return config

    def rebuild(self, model: nn.Module, config: TechniqueConfig) -> nn.Module | None:
        """For techniques that change the module tree: the same structural change with placeholder weights
        (returning the new model if it wraps it, as ``apply`` does). ``load_artifact`` replays it from the
        recipe before loading the stored weights, so a changed architecture loads without pickle."""
        return None

    def finish(self, model: nn.Module, config: TechniqueConfig, ctx: CompressionContext) -> None:
        """After the pipeline's last fine-tuning, before the result is baked: what depends on the final weights
        (static int8's activation ranges)."""

    def reshapes(self, config: TechniqueConfig) -> bool:
        """Whether ``config`` changes tensor shapes (channel pruning, early-exit heads). True lets
        ``load_artifact`` resize the freshly built layers to the stored shapes; without such a step in the
        recipe, a shape that differs means the model's code changed, and loading refuses it."""
        return False

    def fine_tune_rounds(self, config: TechniqueConfig) -> int:
        """How many times ``apply`` calls ``ctx.fine_tune`` itself (iterative pruning: between its steps), so a
        trial knows its whole fine-tuning in advance (early stopping judges a trial by the share of it done)."""
        return 0

    def inapplicable(self, model: nn.Module) -> str | None:
        """Why the technique cannot act on ``model`` at all (separable substitution on a transformer), or None;
        validation refuses such a technique in the space before anything runs."""
        return None


def all_outputs(model: nn.Module, inputs: Inputs) -> Any:
    """Every output ``model`` has: each exit's logits for a model with exits (its ``all_outputs``), else its logits.

    Graph tracers (Torch-Pruning) need them all, or the exit heads would be left out
    of the dependency graph and keep stale input sizes when channels are removed.
    """
    outputs = getattr(model, "all_outputs", None)
    return outputs(inputs) if callable(outputs) else logits_of(call(model, inputs))


def summed_over_exits(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` summed over every exit when the model returns several logits (early exits, in training mode); for a
    slimmable network's ``WidthLogits``, the sandwich rule's loss: ``loss_fn`` on the widest network plus in-place
    distillation of each narrower width drawn for the batch from the widest one's predictions, detached (Yu and
    Huang, ICCV 2019)."""

    def loss(outputs, labels, inputs: Inputs) -> torch.Tensor:
        if isinstance(outputs, ExitLogits):
            return sum(loss_fn(logits, labels, inputs) for logits in outputs)
        if isinstance(outputs, WidthLogits):
            teacher = torch.softmax(outputs[0].detach(), dim=-1)
            return loss_fn(outputs[0], labels, inputs) + sum(soft_cross_entropy(narrower, teacher) for narrower in outputs[1:])
        return loss_fn(outputs, labels, inputs)

    return loss


def soft_cross_entropy(logits: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against predicted ``probabilities`` (in-place distillation's loss)."""
    return -(probabilities * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, _inputs: Inputs) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, labels)


def compressible_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Weight tensors of convolutions, linear layers and embeddings (a text model's largest tensor: 776 KB of a small
    BERT's 933 KB), and the input projection of ``nn.MultiheadAttention`` (a Parameter, not a Linear), by parameter
    name, each with the module that holds it.

    These are the tensors that pruning and quantization act on; biases and
    normalisation parameters are a rounding error in size and stay float (the bias of
    a layer that quantization or clustering compresses at float16: ``round_bias_to_half``). The
    tensor is ``getattr(module, attribute_of(name))``; its layer is ``module_of(name)``.
    """
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()  # a tensor tied between two layers (input and output embeddings) is compressed once, by its first
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)):
            tensor = module.parametrizations["weight"].original if parametrize.is_parametrized(module, "weight") else module.weight
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            found[f"{prefix}weight"] = module
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            found[f"{prefix}in_proj_weight"] = module  # q, k and v stacked; its out_proj is a Linear, found as one
    return found


def attribute_of(name: str) -> str:
    """``weight`` of ``fc1.weight``, ``in_proj_weight`` of ``attn.in_proj_weight``."""
    return name.rpartition(".")[2]


def on_half_grid(value: torch.Tensor) -> torch.Tensor:
    """``value`` on the float16 grid (``to_half_grid``) in the forward pass, with gradients passed straight through."""
    return value + (to_half_grid(value) - value).detach()


class HalfGrid(nn.Module):
    """Parametrization: the tensor on the float16 grid (``on_half_grid``)."""

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return on_half_grid(value)


def round_bias_to_half(layer: nn.Module, weight_name: str) -> None:
    """Train and store the bias of the layer holding ``weight_name`` on the float16 grid (the artifact then keeps it at
    2 bytes a value: ``encoding.compact_float``). Quantization and clustering call it for every layer whose weights
    they compress: a layer stored at 8 bits or fewer gains nothing from a 24-bit-precise bias, and on Deep
    Compression's LeNet-5 the float32 biases were 5% of the file."""
    attribute = "in_proj_bias" if attribute_of(weight_name) == "in_proj_weight" else "bias"
    if getattr(layer, attribute, None) is not None and not parametrize.is_parametrized(layer, attribute):
        parametrize.register_parametrization(layer, attribute, HalfGrid())


def module_of(name: str) -> str:
    """The layer a compressible weight belongs to: ``fc1`` of ``fc1.weight``, ``attn`` of ``attn.in_proj_weight``."""
    return name.rpartition(".")[0]


def replace_layers(
    model: nn.Module,
    builders: dict[str, Callable[[nn.Module], nn.Module]],
    initialise: Callable[[nn.Module, nn.Module], None],
) -> None:
    """Swap each named layer for ``builders[name](layer)``, initialised from the layer it replaces.

    Architecture techniques use this twice: in ``apply`` with an initialiser that
    approximates the old layer, in ``rebuild`` with ``zero_init``.
    """
    for name, build in builders.items():
        layer = model.get_submodule(name)
        replacement = build(layer)
        initialise(replacement, layer)
        model.set_submodule(name, replacement)


@torch.no_grad()
def zero_init(replacement: nn.Module, _replaced: nn.Module) -> None:
    """Placeholder weights for ``rebuild``: the artifact's weights are loaded over them."""
    for parameter in replacement.parameters():
        parameter.zero_()
