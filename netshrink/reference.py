"""The reference pages of the docs, generated from the code so they cannot drift from it: the experiment file's keys
(from the pydantic models, through their JSON Schema) and the command line (from the typer app). The docs build calls
these (``docs/hooks/reference.py``); ``netshrink schema`` prints the schema they read."""

from __future__ import annotations

import json
from typing import Any

KNOB_FORMS = ("a fixed value", "choices", "a range")  # the titles of a knob's forms (spaces/knobs.knob_json_schema)
BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _code(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return f"`{text}`"


def _anchor(path: str) -> str:
    return path.replace(".", "-").replace("_", "-").lower()


class _Reader:
    """Renders one JSON Schema, section by section (a section: a key whose value is an object of keys)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self.defs = schema.get("$defs", {})

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        return self.defs[node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else node

    def section_of(self, node: dict[str, Any]) -> dict[str, Any] | None:
        """The object schema a key opens, if it opens one (directly, or as the one object form of an ``anyOf``)."""
        candidates = [node, *node.get("anyOf", [])]
        objects = [self.resolve(c) for c in candidates if "$ref" in c or c.get("type") == "object"]
        objects = [o for o in objects if o.get("properties")]
        return objects[0] if len(objects) == 1 and not self.is_knob(node) else None

    @staticmethod
    def is_knob(node: dict[str, Any]) -> bool:
        return [form.get("title") for form in node.get("anyOf", [])][:2] == list(KNOB_FORMS[:2])

    def type_of(self, node: dict[str, Any], path: str) -> str:
        if self.is_knob(node):
            forms = node["anyOf"]
            value = self.type_of({k: v for k, v in forms[0].items() if k != "title"}, path)
            return f"knob: {value}, a list of choices" + (", or a range `{low, high, log, step}`" if len(forms) > 2 else "")
        if "$ref" in node:
            return f"[section](#{_anchor(path)})"
        if "anyOf" in node:
            parts = [self.type_of(form, path) for form in node["anyOf"] if form.get("type") != "null"]
            nullable = any(form.get("type") == "null" for form in node["anyOf"])
            return " or ".join(dict.fromkeys(parts)) + (" or null" if nullable else "")
        if "const" in node:
            return _code(node["const"])
        if "enum" in node:
            return " or ".join(_code(value) for value in node["enum"])
        kind = node.get("type")
        if kind == "array":
            items = node.get("items") or {}
            if "prefixItems" in node:
                return "list"
            return f"list of {self.type_of(items, path)}" if items else "list"
        if kind == "object":
            extra = node.get("additionalProperties")
            return f"map of name to {self.type_of(extra, path)}" if isinstance(extra, dict) and extra else "mapping"
        names = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}
        text = names.get(kind, "any")
        bounds = [f"{sign} {node[key]:g}" for key, sign in BOUNDS if key in node]
        return f"{text} ({', '.join(bounds)})" if bounds else text

    def rows(self, section: dict[str, Any], path: str) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
        required = set(section.get("required", []))
        lines = ["| key | type | default | description |", "|---|---|---|---|"]
        nested = []
        for key, node in section.get("properties", {}).items():
            full = f"{path}.{key}" if path else key
            opened = self.section_of(node)
            if opened is not None:
                nested.append((full, opened))
            if key in required:
                default = "required"
            elif "default" in node:
                default = _code(node["default"])
            elif opened is not None:
                default = f"its [keys' defaults](#{_anchor(full)})"
            elif self.resolve(node).get("type") in ("object", "array"):
                default = "empty"
            else:
                default = "none"
            lines.append(f"| `{full}` | {_cell(self.type_of(node, full))} | {_cell(default)} | {_cell(node.get('description', ''))} |")
        return lines, nested

    def page(self, title: str, intro: str) -> str:
        out = [f"# {title}", "", intro, ""]
        queue: list[tuple[str, dict[str, Any]]] = [("", self.schema)]
        while queue:
            path, section = queue.pop(0)
            heading = f"`{path}`" if path else "Top level"
            out += [f"## {heading} {{#{_anchor(path) if path else 'top-level'}}}", ""]
            doc = section.get("description", "") if path else ""
            if doc:
                out += [" ".join(doc.split()), ""]
            lines, nested = self.rows(section, path)
            out += lines + [""]
            queue[:0] = nested  # a section's own sections follow it (task, task.train, finetune, ...)
        return "\n".join(out)


def experiment_reference_markdown() -> str:
    """Every key of the experiment file: its type with bounds, its default and its description, section by section."""
    from netshrink.config import json_schema

    intro = (
        "Generated from `netshrink/config.py` and the techniques' configs when the docs are built: it cannot drift from "
        "the code. The same facts are in the JSON Schema that `netshrink schema` prints "
        "([experiment.schema.json](../experiment.schema.json)), which editors use to validate and complete the file. "
        "A **knob** (a key under `space.<technique>`) is a single value (fixed), a list (the sampler picks one) or, "
        "for a number, a range `{low, high, log, step}`; see [The experiment file](../experiment-file.md)."
    )
    return _Reader(json_schema()).page("Experiment file reference", intro)


def cli_reference_markdown() -> str:
    """Every command of ``netshrink``, its help text, arguments and options, as ``--help`` prints them."""
    import typer

    from netshrink.cli import app

    group = typer.main.get_command(app)
    out = [
        "# Command-line reference",
        "",
        "Generated from the `netshrink` command (`netshrink/cli.py`) when the docs are built; "
        "`netshrink --help` and `netshrink COMMAND --help` print the same.",
        "",
        " ".join((group.help or "").split()),
        "",
    ]
    context = group.context_class(group, info_name="netshrink")
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        sub = command.context_class(command, info_name=name, parent=context)
        out += [f"## `netshrink {name}`", "", "```", command.get_usage(sub).strip(), "```", ""]
        out += [(command.help or "").strip(), ""]
        rows = ["| argument or option | help |", "|---|---|"]
        for param in command.get_params(sub):
            if param.name == "help":
                continue
            record = param.get_help_record(sub)
            names, text = record if record else (param.name.upper(), "")
            text = text or getattr(param, "help", None) or ""
            rows.append(f"| `{_cell(names)}` | {_cell(text)} |")
        out += rows + [""]
    return "\n".join(out)
