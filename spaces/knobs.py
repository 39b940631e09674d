"""One searchable dimension: a fixed value, a list of choices, or a numeric range.

YAML forms, for a technique field ``f``:
- ``f: 0.5``                          fixed, not searched
- ``f: [weight, channel]``            Optuna categorical over these values
- ``f: {low: 0.2, high: 0.9}``        Optuna float (or int) distribution; ``log: true`` for log scale, ``step`` optional
- ``layer_bits: {conv1: 8, fc1: 4}``  a per-layer map (fields marked ``PER_LAYER``): one fixed value
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

Scalar = bool | int | float | str


class Trial(Protocol):
    """The part of ``optuna.Trial`` a space uses (Ray's define-by-run wrapper has it too)."""

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...


@dataclass(frozen=True)
class Fixed:
    value: Any

    def suggest(self, trial: Trial, name: str) -> Any:
        return self.value


@dataclass(frozen=True)
class Choice:
    options: tuple[Scalar, ...]

    def suggest(self, trial: Trial, name: str) -> Any:
        if len(self.options) == 1:
            return self.options[0]
        return trial.suggest_categorical(name, list(self.options))


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def suggest(self, trial: Trial, name: str) -> Any:
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


Knob = Fixed | Choice | Range

_RANGE_KEYS = {"low", "high", "log", "step"}


def _field_adapter(field: FieldInfo) -> TypeAdapter:
    if not field.metadata:
        return TypeAdapter(field.annotation)
    return TypeAdapter(Annotated[(field.annotation, *field.metadata)])


def _is_numeric(field: FieldInfo) -> tuple[bool, bool]:
    """(numeric, integer) for a field annotation; Literal fields are not ranges."""
    annotation = field.annotation
    if annotation is int:
        return True, True
    if annotation is float:
        return True, False
    return False, False


def _check_value(adapter: TypeAdapter, value: Any, what: str) -> Any:
    try:
        return adapter.validate_python(value, strict=False)
    except ValidationError as error:
        raise ValueError(f"{what} {value!r}: {error.errors()[0]['msg']}") from None


def _as_option(raw: Any, checked: Any) -> Scalar:
    """The value the sampler sees: the checked one, or the user's string where checking made it a structure
    (``"pool1+pool2"`` for ``after``): Optuna's categorical choices must be plain scalars."""
    return checked if isinstance(checked, Scalar) else raw


def as_yaml(knob: Knob) -> Any:
    """The knob as written in an experiment file (the inverse of ``parse_knob``)."""
    if isinstance(knob, Fixed):
        return list(knob.value) if isinstance(knob.value, tuple) else knob.value
    if isinstance(knob, Choice):
        return list(knob.options)
    written = {"low": knob.low, "high": knob.high}
    if knob.log:
        written["log"] = True
    if knob.step is not None:
        written["step"] = knob.step
    return written


def knob_json_schema(field: FieldInfo) -> dict[str, Any]:
    """The JSON Schema of the forms ``parse_knob`` takes for ``field``: its value (with the field's own bounds), a list
    of choices, and for a numeric field a ``{low, high, log, step}`` range; what editors validate and complete."""
    value = _field_adapter(field).json_schema(mode="validation")
    if "$defs" in value or "$ref" in value:  # not a plain value: accept what validation accepts, validation checks it
        value = {}
    forms: list[dict[str, Any]] = [
        {**value, "title": "a fixed value"},
        {"type": "array", "items": value, "minItems": 1, "title": "choices", "description": "the sampler picks one of these"},
    ]
    numeric, integer = _is_numeric(field)
    if numeric:
        bound = {key: item for key, item in value.items() if key in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")}
        forms.append({
            "type": "object", "title": "a range", "required": ["low", "high"], "additionalProperties": False,
            "properties": {
                "low": bound, "high": bound,
                "log": {"type": "boolean", "description": "sample on a log scale (needs low > 0; not with step)"},
                "step": {"type": "integer" if integer else "number", "exclusiveMinimum": 0, "description": "sample on a grid of this step"},
            },
        })
    return {"anyOf": forms}


def parse_knob(raw: Any, field: FieldInfo) -> Knob:
    """Turn a YAML value into a knob, checking every value it can take against the field's own rules."""
    if isinstance(raw, (Fixed, Choice, Range)):
        return raw
    adapter = _field_adapter(field)
    extra = field.json_schema_extra
    if isinstance(raw, dict) and isinstance(extra, dict) and extra.get("per_layer"):
        return Fixed(value=_check_value(adapter, raw, "value"))  # layer -> value: one fixed choice, never searched
    if isinstance(raw, dict):
        unknown = set(raw) - _RANGE_KEYS
        if unknown:
            raise ValueError(f"unknown range key(s) {sorted(unknown)}; a range has low, high and optional log, step")
        if "low" not in raw or "high" not in raw:
            raise ValueError("a range needs both 'low' and 'high'")
        numeric, integer = _is_numeric(field)
        if not numeric:
            raise ValueError("this knob is not numeric: give a list of choices or a single value, not a range")
        low = _check_value(adapter, raw["low"], "low")
        high = _check_value(adapter, raw["high"], "high")
        if not low < high:
            raise ValueError(f"low must be smaller than high (got low={low}, high={high})")
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise ValueError(f"log must be true or false, got {log!r}")
        step = raw.get("step")
        if step is not None and (not isinstance(step, (int, float)) or isinstance(step, bool) or step <= 0):
            raise ValueError(f"step must be a positive number, got {step!r}")
        if log and step is not None:
            raise ValueError("a range cannot have both log: true and a step")
        if log and low <= 0:
            raise ValueError(f"a log-scale range needs low > 0 (got {low})")
        if integer and step is not None and step != int(step):
            raise ValueError(f"step of an integer knob must be an integer, got {step}")
        return Range(low=low, high=high, log=log, step=step, integer=integer)
    if isinstance(raw, list):
        if not raw:
            raise ValueError("a list of choices cannot be empty")
        options = tuple(_as_option(value, _check_value(adapter, value, "choice")) for value in raw)
        if len(set(options)) != len(options):
            raise ValueError(f"choices repeat a value: {list(raw)}")
        return Choice(options=options)
    return Fixed(value=_check_value(adapter, raw, "value"))
