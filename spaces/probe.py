"""Probing a space on the user's model before a search: no trial may fail because a pipeline broke the model.

A technique that cannot act on the model at all (``Technique.inapplicable``: separable
substitution on a transformer) is refused by name. Then pipelines of the space are
applied to the untrained model, without fine-tuning: each technique that changes the
model's structure (``Stage.ARCHITECTURE``, early exits, channel pruning) alone at every
choice of its categorical knobs and at the high end of its ranges, and pipelines drawn
at random from the whole space (fixed seed). Each must run a forward pass; one that
changes the structure must also export to ONNX computing what torch computes (once per
combination of the structural techniques in it: the exports are most of the time).
Every two structural techniques are also tried together, each at each of those settings
(``separable(which=all)`` then channel pruning broke RGB models while each alone ran).
Quantization, clustering, distillation and weight pruning change values, not shapes:
each is probed once alone, and left out of the drawn pipelines. A few seconds on small models; what
fails is reported with the technique, the pipeline and the error, before the baseline
trains.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from netshrink.techniques import REGISTRY, Pipeline, Stage, compress
from netshrink.techniques.registry import exclusion
from netshrink.techniques.base import compressible_weights, module_of
from netshrink.techniques.inputs import Inputs, call, concat
from netshrink.techniques.allocation import CLUSTER_COUNTS, QUANTIZATION_WIDTHS

from .knobs import Choice, Fixed

RANDOM_DRAWS = 6


def flat_sensitivity(model: nn.Module) -> dict:
    """Scores that let ``allocation: sensitivity`` run on a probe (every width equally bearable): shapes, not choices."""
    layers = {module_of(name) for name in compressible_weights(model)}
    return {
        "quantization": {layer: {width: 0.0 for width in QUANTIZATION_WIDTHS} for layer in layers},
        "clustering": {layer: {width: 0.0 for width in CLUSTER_COUNTS} for layer in layers},
    }


def inapplicable(space, model: nn.Module) -> list[str]:
    """``space.<kind>: reason`` for each technique the space may switch on that cannot act on ``model``."""
    problems = []
    for kind, switch in space.switches().items():
        reason = REGISTRY[kind].inapplicable(model) if switch is not False else None
        if reason:
            problems.append(f"space.{kind}: {reason}")
    return problems


def changes_structure(step) -> bool:
    """Whether ``step`` changes the model's layers or shapes (the steps that can break a forward pass or an export)."""
    stage = REGISTRY[step.kind].stage
    return stage in (Stage.ARCHITECTURE, Stage.DYNAMIC) or REGISTRY[step.kind].reshapes(step)


def _alone(space) -> list[Pipeline]:
    """Each technique alone: every choice of each categorical knob, the ranges at their high end."""
    pipelines = []
    for kind, technique_space in space.techniques().items():
        if space.switches()[kind] is False:
            continue
        knobs = technique_space.knobs()
        base = {name: _first(knob) for name, knob in knobs.items()}
        variants = [base]
        for name, knob in knobs.items():
            if isinstance(knob, Choice):
                variants += [{**base, name: value} for value in knob.options[1:]]
        for values in variants:
            try:
                pipeline = Pipeline(steps=[REGISTRY[kind].config_type(**values)])
            except ValueError:
                continue  # a combination of knob values the technique itself refuses: never sampled either
            if any(changes_structure(step) for step in pipeline.active_steps()) or values is base:
                pipelines.append(pipeline)  # a technique that changes values only: once, at its first values
    return pipelines


def _pairs(space) -> list[Pipeline]:
    """Every two structural techniques of the space together (those that may be active together), each at each of its
    variants in ``_alone`` (every choice of a categorical knob, the ranges at their high end): ``separable(which=all)``
    then channel pruning broke every RGB model mid-search while each alone ran."""
    variants: dict[str, list] = {}
    for pipeline in _alone(space):
        for step in pipeline.active_steps():
            if changes_structure(step):
                variants.setdefault(step.kind, []).append(step)
    kinds = sorted(variants, key=lambda kind: REGISTRY[kind].stage)
    pipelines = []
    for index, first in enumerate(kinds):
        for second in kinds[index + 1 :]:
            if exclusion(first, second):
                continue
            for a in variants[first]:
                for b in variants[second]:
                    try:
                        pipelines.append(Pipeline(steps=[a, b]))
                    except ValueError:
                        continue  # an order or combination the pipeline itself refuses: never sampled either
    return pipelines


def _first(knob) -> Any:
    if isinstance(knob, Fixed):
        return knob.value
    if isinstance(knob, Choice):
        return knob.options[0]
    return int(knob.high) if knob.integer else knob.high


def _drawn(space, draws: int, seed: int) -> list[Pipeline]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), directions=["maximize"])
    pipelines = []
    for _ in range(draws):
        trial = study.ask()
        steps = [step for step in space.sample(trial).active_steps() if changes_structure(step)]
        study.tell(trial, 0.0)
        if steps:
            pipelines.append(Pipeline(steps=steps))  # the values a technique sets cannot break shapes: left out
    return pipelines


def probe(space, model: nn.Module, example_inputs: Inputs, draws: int = RANDOM_DRAWS, seed: int = 0) -> list[str]:
    """Problems of ``space`` on ``model``, in words (empty when every probed pipeline runs and exports)."""
    problems = inapplicable(space, model)
    if problems:
        return problems
    from netshrink.deploy.onnx_export import exports_faithfully

    scores = flat_sensitivity(model)
    seen, exported = set(), set()
    batch = concat([example_inputs, example_inputs])
    for pipeline in _alone(space) + _pairs(space) + _drawn(space, draws, seed):
        recipe = pipeline.recipe()
        if recipe in seen or not pipeline.active_steps():
            continue
        seen.add(recipe)
        try:
            compressed = compress(copy.deepcopy(model), pipeline, example_inputs, sensitivity=scores)
            with torch.no_grad():
                call(compressed.model.eval(), batch)
            structural = frozenset(step.kind for step in pipeline.active_steps() if changes_structure(step))
            if structural and structural not in exported:  # one export per combination of structural techniques
                exported.add(structural)
                exports_faithfully(compressed.model, compressed.encodings, example_inputs)
        except Exception as error:  # whatever a technique or the export raises on this model
            kinds = ", ".join(step.kind for step in pipeline.active_steps())
            problems.append(f"space ({kinds}): {pipeline.describe()} breaks this model: {type(error).__name__}: {str(error)[:400]}")
            if len(problems) >= 3:
                break
    return problems
