"""The search space: per technique an on/off switch and its knobs.

The schema is generated from the technique registry: each technique's space
accepts exactly the fields of its config, and each knob is checked against
that field's own constraints. Adding a technique needs no change here.

YAML::

    space:
      pruning:
        enabled: search            # search (the sampler decides) | true | false
        granularity: [weight, channel]
        ratio: {low: 0.2, high: 0.9}
      quantization:
        bits: [16, 8]
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model, model_validator

from netshrink.techniques import REGISTRY, Pipeline, TechniqueConfig, exclusion
from netshrink.techniques.base import is_applied_field
from netshrink.techniques.registry import compresses, conflicts, knob_applies

from .knobs import Choice, Fixed, Knob, Range, Trial, as_yaml, knob_json_schema, parse_knob

def _parse_switch(value: Any) -> Any:
    if value == "search" or isinstance(value, bool):
        return value
    raise ValueError(f"must be 'search' (the sampler decides), true or false, got {value!r}")


Switch = Annotated[Literal["search"] | bool, BeforeValidator(_parse_switch)]


class TechniqueSpace(BaseModel):
    """Base of the generated per-technique spaces."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    enabled: Switch = Field("search", description="search: the sampler switches it on or off; true/false: always/never")

    def knobs(self) -> dict[str, Knob]:
        return {name: getattr(self, name) for name in type(self).model_fields if name != "enabled"}


def _technique_space_model(kind: str) -> type[TechniqueSpace]:
    technique = REGISTRY[kind]
    config_type: type[TechniqueConfig] = technique.config_type
    defaults = technique.default_space
    fields: dict[str, Any] = {}
    for name, info in config_type.model_fields.items():
        if name in ("kind", "version") or is_applied_field(config_type, name):  # not knobs: filled in when applied
            continue
        default = parse_knob(defaults[name], info) if name in defaults else Fixed(info.default)
        fields[name] = (
            Annotated[Knob, BeforeValidator(partial(parse_knob, field=info)), WithJsonSchema(knob_json_schema(info))],
            Field(default, description=info.description, json_schema_extra={"default": as_yaml(default)}),
        )
    return create_model(f"{config_type.__name__.removesuffix('Config')}Space", __base__=TechniqueSpace, **fields)


TECHNIQUE_SPACES: dict[str, type[TechniqueSpace]] = {kind: _technique_space_model(kind) for kind in REGISTRY}
# Generated classes must be importable by name: Ray pickles the searcher, and with it the space.
globals().update({model.__name__: model for model in TECHNIQUE_SPACES.values()})


class _SearchSpaceBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_defaults(cls, data: Any) -> Any:
        # ``pruning:`` with nothing under it in YAML means "search it with the default knobs".
        if isinstance(data, dict):
            return {key: ({} if value is None else value) for key, value in data.items()}
        return data

    def techniques(self) -> dict[str, TechniqueSpace]:
        """Listed techniques in pipeline order."""
        listed = {kind: getattr(self, kind) for kind in type(self).model_fields if getattr(self, kind) is not None}
        return dict(sorted(listed.items(), key=lambda item: REGISTRY[item[0]].stage))

    @model_validator(mode="after")
    def _forced_techniques_combine(self) -> "_SearchSpaceBase":
        forced = [kind for kind, space in self.techniques().items() if space.enabled is True]
        problems = [f"{a} and {b} are both enabled: true, but cannot both be active: {reason}" for a, b, reason in conflicts(forced)]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def switches(self) -> dict[str, Switch]:
        """Each listed technique's on/off switch, with techniques excluded by a forced-on one switched off."""
        techniques = self.techniques()
        forced = [kind for kind, space in techniques.items() if space.enabled is True]
        return {
            kind: False if any(exclusion(kind, other) is not None for other in forced) else space.enabled
            for kind, space in techniques.items()
        }

    def sample(self, trial: Trial) -> Pipeline:
        """Define-by-run: ask ``trial`` for each knob (``<technique>/<field>``) and build the pipeline.

        A pipeline never comes out without a technique that compresses: the
        uncompressed model is the baseline, measured once per search, and
        distillation alone (``Technique.compresses`` False) would only fine-tune it.
        When every searchable compressing technique before the last one was switched
        off (or drew its no-op value, such as 32 bits) and none is forced on, the last
        one is on without a ``<technique>/enabled`` question. That one may still draw
        its no-op value; the searcher answers such a pipeline with the baseline's
        figures instead of training it. A technique that an enabled one excludes
        (``Technique.excludes``) is off without a question; this never empties the
        pipeline, since only an enabled technique excludes.
        """
        steps = []
        techniques = self.techniques()
        switches = self.switches()
        last = self._last_implied_switch()
        for kind, space in techniques.items():
            enabled = switches[kind]
            if any(exclusion(kind, step.kind) is not None for step in steps if not step.is_noop()):
                continue
            if enabled == "search":
                if kind == last and not any(compresses(step.kind) and not step.is_noop() for step in steps):
                    enabled = True
                else:
                    enabled = trial.suggest_categorical(f"{kind}/enabled", [True, False])
            if not enabled:
                continue
            steps.append(REGISTRY[kind].config_type(**self._ask_knobs(trial, kind, space)))
        return Pipeline(steps=steps)

    def _last_implied_switch(self) -> str | None:
        """The searchable compressing technique that is on without a question when no compressing one before it is
        (``sample``); None when a compressing technique is forced on, or none is searchable."""
        switches = self.switches()
        if any(switch is True and compresses(kind) for kind, switch in switches.items()):
            return None
        searchable = [kind for kind, switch in switches.items() if switch == "search" and compresses(kind)]
        return searchable[-1] if searchable else None

    @staticmethod
    def _ask_knobs(trial: Trial, kind: str, space: TechniqueSpace) -> dict[str, Any]:
        """Ask every knob whose condition (``Technique.conditions``) holds; the others keep their default."""
        values: dict[str, Any] = {}
        for name, knob in space.knobs().items():
            if knob_applies(kind, name, values):
                values[name] = knob.suggest(trial, f"{kind}/{name}")
        return values

    def searched_names(self) -> list[str]:
        """Parameter names the sampler may ask for."""
        techniques = self.techniques()
        switches = self.switches()
        last = self._last_implied_switch()
        compressing = [kind for kind, switch in switches.items() if switch == "search" and compresses(kind)]
        names = []
        for kind, space in techniques.items():
            if switches[kind] == "search" and not (kind == last and compressing == [kind]):  # the only one: always implied
                names.append(f"{kind}/enabled")
            if switches[kind] is not False:
                knobs = space.knobs()
                fixed = {name: knob.value for name, knob in knobs.items() if isinstance(knob, Fixed)}
                conditions = REGISTRY[kind].conditions
                names += [
                    f"{kind}/{name}"
                    for name, knob in knobs.items()
                    # a knob whose condition a fixed value rules out is never asked
                    if isinstance(knob, Range) or (isinstance(knob, Choice) and len(knob.options) > 1)
                    and all(fixed.get(field, wanted) == wanted for field, wanted in conditions.get(name, {}).items())
                ]
        return names


SearchSpace: type[_SearchSpaceBase] = create_model(
    "SearchSpace",
    __base__=_SearchSpaceBase,
    **{kind: (Optional[model], Field(None, description=REGISTRY[kind].summary)) for kind, model in TECHNIQUE_SPACES.items()},
)
