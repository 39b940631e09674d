"""A pipeline: an ordered list of technique configs, and the function that applies it.

The pipeline's JSON is the *recipe*: MLflow stores it and export replays it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Callable, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.nn.utils import parametrize

from .base import ORDER, CompressionContext, FineTune, LossFn, TechniqueConfig, cross_entropy, is_applied_field, is_quiet_field, summed_over_exits
from .encoding import TensorEncoding
from .inputs import Inputs, output_layers
from .registry import REGISTRY, conflicts, knob_applies

Step = Annotated[
    Union[tuple(technique.config_type for technique in REGISTRY.values())],  # type: ignore[valid-type]
    Field(discriminator="kind"),
]


class Pipeline(BaseModel):
    """Techniques in application order: architecture -> early exits or widths -> distillation -> pruning -> quantization."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: list[Step] = Field(default_factory=list)

    @field_validator("steps")
    @classmethod
    def _order(cls, steps: list[TechniqueConfig]) -> list[TechniqueConfig]:
        kinds = [step.kind for step in steps]
        for kind in set(kinds):
            if kinds.count(kind) > 1:
                raise ValueError(f"technique {kind!r} appears {kinds.count(kind)} times; each technique may appear once")
        stages = [REGISTRY[kind].stage for kind in kinds]
        for (before, after), (kind_a, kind_b) in zip(zip(stages, stages[1:]), zip(kinds, kinds[1:])):
            if after < before:
                raise ValueError(
                    f"{kind_b!r} cannot come after {kind_a!r}: the order is {ORDER}"
                )
        for kind_a, kind_b, reason in conflicts([step.kind for step in steps if not step.is_noop()]):
            raise ValueError(f"{kind_a!r} and {kind_b!r} cannot both be active: {reason}")
        return steps

    def recipe(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_recipe(cls, recipe: str) -> "Pipeline":
        """The pipeline a recipe (its JSON) describes; ``ValueError`` if a step was written under other rules than
        this netshrink's (``TechniqueConfig.VERSION``), or before recipes carried versions."""
        import json

        try:
            steps = json.loads(recipe).get("steps", [])
        except (ValueError, AttributeError):
            steps = []  # not JSON, or not an object: pydantic says what is wrong below
        unversioned = [step.get("kind") for step in steps if isinstance(step, dict) and step.get("kind") in REGISTRY and "version" not in step]
        if unversioned:
            raise ValueError(
                f"recipe step(s) {', '.join(map(repr, unversioned))} carry no version: written by netshrink 0.2 or older, whose "
                "rules for rebuilding a model differ; run the search again with this netshrink"
            )
        return cls.model_validate_json(recipe)

    def active_steps(self) -> list[TechniqueConfig]:
        return [step for step in self.steps if not step.is_noop()]

    def fine_tune_rounds(self) -> int:
        """Fine-tunings ``compress`` runs for this pipeline: those the techniques run while applying, and the final one."""
        if not self.active_steps():
            return 0
        return 1 + sum(REGISTRY[step.kind].fine_tune_rounds(step) for step in self.active_steps())

    def describe(self) -> str:
        """One line for tables: ``pruning(channel, ratio=0.52) + quantization(bits=8)``."""
        if not self.active_steps():
            return "uncompressed"
        parts = []
        for step in self.active_steps():
            values = step.model_dump(exclude={"kind", "version"})
            fields = [
                f"{key}={_short(value)}"
                for key, value in values.items()
                if value is not None  # a per-layer map that was not given
                and knob_applies(step.kind, key, values)  # e.g. no importance under weight pruning
                and not _quiet_default(step, key, value)  # e.g. head_ratio=0 on every channel pruning of a CNN
                and not is_applied_field(type(step), key)  # the layers it chose: in the recipe, too long for a line
            ]
            parts.append(f"{step.kind}({', '.join(fields)})")
        return " + ".join(parts)


def _quiet_default(step: TechniqueConfig, key: str, value) -> bool:
    """A knob left off (at a default of 0) that the technique does not search by default (``head_ratio`` 0): left out of one-liners."""
    default = type(step).model_fields[key].default
    return key not in REGISTRY[step.kind].default_space and (not default or is_quiet_field(type(step), key)) and value == default


def _short(value) -> str:
    """``0.457``, ``pool1+pool2``, ``conv1:8/fc1:4``: a knob's value as a summary shows it."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, tuple):
        return "+".join(value)
    if isinstance(value, dict):
        return "/".join(f"{key}:{_short(item)}" for key, item in value.items())
    return str(value)


FinalFineTune = Callable[[nn.Module, LossFn, Callable[[nn.Module], "Compressed"]], None]  # (model, loss, snapshot)


@dataclass
class Compressed:
    model: nn.Module
    encodings: dict[str, TensorEncoding]
    pipeline: Pipeline
    notes: list[str] = field(default_factory=list)  # layers a technique left out, and why


def compress(
    model: nn.Module,
    pipeline: Pipeline,
    example_inputs: Inputs,
    *,
    fine_tune: FineTune | None = None,
    seed: int = 0,
    sensitivity: dict | None = None,
    calibration_inputs: Inputs | None = None,
    loss_fn: LossFn | None = None,
    final_fine_tune: FinalFineTune | None = None,
) -> Compressed:
    """Apply ``pipeline`` to a copy of ``model``, fine-tune, and bake the result.

    The caller's model is never mutated. After this returns, the model's weights
    are exactly the values the artifact stores (masks and fake quantization are
    folded in), so evaluating it evaluates the artifact. ``sensitivity`` (the
    baseline's per-layer scores) is what ``allocation: sensitivity`` allocates widths from; ``calibration_inputs``
    (training samples) calibrate the activation ranges of static int8 (``quantization.activations``); ``loss_fn`` is the
    task's training loss (logits, targets, inputs) -> loss, cross-entropy by default.

    ``final_fine_tune``, when given, runs the pipeline's last fine-tuning instead of ``fine_tune`` (which still
    runs the fine-tunings a technique asks for while applying, iterative pruning's). It gets the model, the loss
    and ``snapshot``: a function that returns what ``compress`` would return if fine-tuning ended now, built on
    a copy, so that training goes on from where it stands. Multi-fidelity trials measure the model at each rung
    this way (``netshrink.deploy.evaluate``).
    """
    torch.manual_seed(seed)
    task_loss = loss_fn or cross_entropy
    teacher = model
    model = copy.deepcopy(model)
    tune = None
    if fine_tune is not None:
        # with early exits the model trains on the sum of every exit's loss (BranchyNet)
        tune = lambda model, loss: fine_tune(model, summed_over_exits(loss or task_loss))  # noqa: E731
    ctx = CompressionContext(
        example_inputs=example_inputs,
        encodings={},
        protected_modules=output_layers(model, example_inputs),
        fine_tune=tune,
        seed=seed,
        teacher=teacher,
        sensitivity=sensitivity,
        calibration_inputs=calibration_inputs,
        task_loss=task_loss,
    )
    applied: dict[int, TechniqueConfig] = {}
    for index, step in enumerate(pipeline.steps):
        if step.is_noop():
            continue
        technique = REGISTRY[step.kind]
        step = technique.resolve(model, step, ctx)
        model = technique.apply(model, step, ctx) or model
        applied[index] = technique.record(model, step, ctx)
    # the recipe of what was done: every decision taken from the model's shapes written out
    done = Pipeline(steps=[applied.get(index, step) for index, step in enumerate(pipeline.steps)])

    def finished(model: nn.Module, ctx: CompressionContext) -> Compressed:
        for step in applied.values():
            REGISTRY[step.kind].finish(model, step, ctx)
        bake_parametrizations(model)
        return Compressed(model=model.eval(), encodings=ctx.encodings, pipeline=done, notes=ctx.notes)

    def snapshot(current: nn.Module) -> Compressed:
        """The result as of now, on copies: the model being fine-tuned and the context stay as they are."""
        was_training = current.training
        duplicate = copy.deepcopy(current).cpu()
        current.train(was_training)
        own_parametrized_classes(duplicate)
        return finished(duplicate, dataclasses.replace(ctx, encodings=copy.deepcopy(ctx.encodings), notes=list(ctx.notes)))

    if applied and final_fine_tune is not None:
        final_fine_tune(model, summed_over_exits(ctx.loss_fn or task_loss), snapshot)
    elif applied and tune is not None:
        tune(model, ctx.loss_fn)
    return finished(model, ctx)


def own_parametrized_classes(model: nn.Module) -> None:
    """Give each parametrized module of a deep copy a class of its own. ``torch.nn.utils.parametrize`` makes a
    class per module it parametrizes and removing a parametrization deletes the tensor's property from that class:
    baking a copy that shares the class would take ``weight`` away from the original too."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            attributes = {key: value for key, value in cls.__dict__.items() if key not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, attributes)


def bake_parametrizations(model: nn.Module) -> None:
    """Replace every parametrized tensor by its current parametrized value."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
