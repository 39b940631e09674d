"""No file is unpickled by netshrink's own code.

Unpickling runs whatever code the file names, so a model or a result downloaded
from a shared tracking server must never go through it: artifacts are safetensors,
configs are YAML read with ``safe_load``, and ``torch.load`` (if it ever comes)
takes ``weights_only=True``. Ray pickles what it ships between its own processes;
the package never needs to. The check reads the syntax tree, so a docstring that
names ``pickle.load`` is not a finding and a call split over lines still is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("netshrink", "search", "spaces", "techniques")
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
UNSAFE_YAML_CALLS = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all"}


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for the expression ``torch.load``; '' for anything that is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Each place in ``source`` that could unpickle a file, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {alias.name}" for alias in node.names if alias.name.split(".")[0] in UNPICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNPICKLING_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            elif node.module == "torch" and any(alias.name == "load" for alias in node.names):
                found.append(f"{where}: from torch import load (call torch.load with weights_only=True)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            if name == "torch.load" and not _is_true(keywords.get("weights_only", ast.Constant(None))):
                found.append(f"{where}: torch.load without weights_only=True")
            if _is_true(keywords.get("allow_pickle", ast.Constant(None))):
                found.append(f"{where}: {name or 'call'}(allow_pickle=True)")
            if name.startswith("yaml.") and name.removeprefix("yaml.") in UNSAFE_YAML_CALLS:
                found.append(f"{where}: {name} (use yaml.safe_load)")
    return found


def package_sources() -> list[Path]:
    return sorted(path for folder in PACKAGE_DIRS for path in (ROOT / folder).rglob("*.py"))


def test_the_package_sources_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in package_sources()}
    assert {"techniques/artifact.py", "search/trial.py", "netshrink/config.py", "spaces/space.py"} <= names


def test_no_package_source_unpickles_a_file():
    found = [hit for path in package_sources() for hit in unsafe_loads(path.read_text(), path.relative_to(ROOT).as_posix())]
    assert not found, "code that could unpickle a file:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import torch\nstate = torch.load('m.pt')",
        "import torch\nstate = torch.load('m.pt', weights_only=False)",
        "import torch\nstate = torch.load(\n    'm.pt',\n    map_location='cpu',\n)",
        "import pickle",
        "import pickle as p",
        "from pickle import loads",
        "import cloudpickle",
        "import joblib",
        "from torch import load",
        "import numpy as np\narray = np.load('a.npy', allow_pickle=True)",
        "import yaml\nconfig = yaml.load(text, Loader=yaml.Loader)",
        "import yaml\nconfig = yaml.unsafe_load(text)",
    ],
)
def test_the_check_catches_unpickling(source):
    assert unsafe_loads(source)


@pytest.mark.parametrize(
    "source",
    [
        "import torch\nstate = torch.load('m.pt', weights_only=True)",
        "import numpy as np\narray = np.load('a.npy')",
        "import yaml\nconfig = yaml.safe_load(text)",
        "from safetensors.torch import load_file\nstate = load_file('m.safetensors')",
        '"""Never call pickle.load or torch.load(path) on a downloaded file."""',
    ],
)
def test_the_check_passes_safe_loading(source):
    assert unsafe_loads(source) == []
