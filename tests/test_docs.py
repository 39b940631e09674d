"""The documentation cannot drift from the code: every key of the experiment file is described, the schema shipped
beside the presets is the one the code generates, every preset validates against it, the docs site builds with no
broken internal link, and the README stays a landing page."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from netshrink.config import SCHEMA_FILE, json_schema

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted([*ROOT.glob("spaces/*.yaml"), *ROOT.glob("examples/**/*.yaml")])
SCHEMA_LINE = re.compile(r"^# yaml-language-server: \$schema=(\S+)$")


def undescribed(schema: dict) -> list[str]:
    """Every key of every section (the top level and each ``$defs`` entry) without a description."""
    sections = {"(top level)": schema, **schema.get("$defs", {})}
    return [f"{name}.{key}" for name, section in sections.items() for key, node in section.get("properties", {}).items() if not node.get("description")]


def test_every_key_of_the_experiment_file_has_a_description():
    missing = undescribed(json_schema())
    assert not missing, f"add a Field(description=...) to: {', '.join(missing)} (the docs' reference and the schema show it)"


def test_the_check_finds_a_key_without_a_description():
    schema = {"properties": {"a": {"description": "x"}}, "$defs": {"Section": {"properties": {"b": {"type": "integer"}}}}}
    assert undescribed(schema) == ["Section.b"]


def test_the_schema_beside_the_presets_is_the_generated_one():
    shipped = json.loads((ROOT / "spaces" / SCHEMA_FILE).read_text())
    assert shipped == json_schema(), f"regenerate it: netshrink schema -o spaces/{SCHEMA_FILE}"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_preset_names_the_schema_and_validates_against_it(preset):
    first = preset.read_text().splitlines()[0]
    match = SCHEMA_LINE.match(first)
    assert match, f"{preset.name}: the first line must be '# yaml-language-server: $schema=<path to {SCHEMA_FILE}>'"
    schema_path = (preset.parent / match.group(1)).resolve()
    assert schema_path == (ROOT / "spaces" / SCHEMA_FILE).resolve()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft202012Validator(json_schema()).iter_errors(yaml.safe_load(preset.read_text()))]
    assert not errors, errors


@pytest.mark.parametrize(
    "change, where",
    [
        ({"search": {"sampler": "bayes"}}, "search/sampler"),
        ({"search": {"trails": 4}}, "search"),
        ({"space": {"pruning": {"ratio": {"low": 0.2, "high": 1.5}}}}, "space/pruning/ratio"),
        ({"space": {"pruning": {"ratio": {"low": 0.2, "hi": 0.9}}}}, "space/pruning/ratio"),
        ({"space": {"quantization": {"bits": [8, 3]}}}, "space/quantization/bits"),
        ({"search": {"multi_fidelity": "sometimes"}}, "search/multi_fidelity"),
    ],
)
def test_the_schema_refuses_what_validation_refuses(change, where):
    """The schema an editor reads catches the same mistakes as netshrink's own validation, at the same key."""
    from netshrink.config import Experiment

    raw = yaml.safe_load((ROOT / "spaces" / "digits.yaml").read_text())
    for key, value in change.items():
        raw[key] = {**raw.get(key, {}), **value}
    errors = list(jsonschema.Draft202012Validator(json_schema()).iter_errors(raw))

    def paths(error) -> list[str]:  # the error and, under an anyOf, each alternative's own errors
        return ["/".join(map(str, error.absolute_path)), *(path for sub in error.context for path in paths(sub))]

    assert errors and any(path.startswith(where) for e in errors for path in paths(e)), [e.message for e in errors]
    with pytest.raises(Exception):
        Experiment.model_validate(raw)


def test_the_schema_accepts_every_form_of_a_knob():
    raw = yaml.safe_load((ROOT / "spaces" / "digits.yaml").read_text())
    raw["space"]["pruning"] = {"enabled": True, "ratio": 0.5, "granularity": ["weight", "channel"], "steps": {"low": 1, "high": 3}}
    raw["search"]["multi_fidelity"] = {"min_epochs": 1, "reduction_factor": 3}
    raw["search"]["budget"] = {"minutes": 30}
    assert not list(jsonschema.Draft202012Validator(json_schema()).iter_errors(raw))


def test_netshrink_schema_prints_the_schema(tmp_path):
    printed = subprocess.run([sys.executable, "-m", "netshrink.cli", "schema"], capture_output=True, text=True, check=True).stdout
    assert json.loads(printed) == json_schema()
    subprocess.run([sys.executable, "-m", "netshrink.cli", "schema", "-o", str(tmp_path / "s.json")], capture_output=True, check=True)
    assert json.loads((tmp_path / "s.json").read_text()) == json_schema()


def test_netshrink_schema_into_a_folder_that_does_not_exist_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", "schema", "-o", str(tmp_path / "missing" / "s.json")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "--output" in result.stderr and "Traceback" not in result.stderr


def test_the_reference_pages_cover_every_key_and_command():
    from netshrink.reference import cli_reference_markdown, experiment_reference_markdown

    page = experiment_reference_markdown()
    for key in ["name", "task.weights", "search.budget.minutes", "search.multi_fidelity.reduction_factor", "space.pruning.ratio", "space.slimmable.narrowest", "measure.threads"]:
        assert f"| `{key}` |" in page, key
    cli = cli_reference_markdown()
    for command in ["search", "validate", "schema", "front", "export"]:
        assert f"## `netshrink {command}`" in cli


def test_the_docs_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: a broken internal link or anchor, a page missing from the nav, or a failing hook
    fails the build (a few seconds)."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "reference" / "experiment-file" / "index.html").is_file()
    assert (site / "reference" / "cli" / "index.html").is_file()
    assert json.loads((site / SCHEMA_FILE).read_text()) == json_schema()


def test_the_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move the detail into docs/"
    links = re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines))
    assert links, "the README links into the docs"
    assert all((ROOT / link).is_file() for link in links), [link for link in links if not (ROOT / link).is_file()]
