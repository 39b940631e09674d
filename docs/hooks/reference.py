"""MkDocs hook: the reference pages and the JSON Schema, generated from the code at every build (``mkdocs build`` and
``mkdocs serve``), so they cannot drift from it. Nothing generated is committed under docs/."""

from __future__ import annotations

import json

from mkdocs.structure.files import File, Files

from netshrink.config import json_schema
from netshrink.reference import cli_reference_markdown, experiment_reference_markdown


def on_files(files: Files, config) -> Files:
    generated = {
        "reference/experiment-file.md": experiment_reference_markdown(),
        "reference/cli.md": cli_reference_markdown(),
        "experiment.schema.json": json.dumps(json_schema(), indent=2) + "\n",
    }
    for path, content in generated.items():
        existing = files.get_file_from_path(path)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, path, content=content))
    return files
