"""Reading YAML the strict way: a key written twice is a mistake, not "the last one wins".

PyYAML's ``safe_load`` silently keeps the last of two equal keys, so a second
``pruning:`` under ``space:`` would replace the first without a word. The
document is composed once into nodes (which keep their line numbers), checked
for repeated keys, then constructed with the safe constructor.
"""

from __future__ import annotations

from typing import Any

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"  # ``<<: *anchor`` merges a mapping; its keys may be overridden on purpose


def duplicate_keys(node: yaml.Node | None, path: str = "") -> list[str]:
    """One line per key that a mapping under ``node`` has more than once: the key's path and every line it is on."""
    found: list[str] = []
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, list[int]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            lines.setdefault(key_node.value, []).append(key_node.start_mark.line + 1)
            found += duplicate_keys(value_node, f"{path}.{key_node.value}" if path else key_node.value)
        for key, where in lines.items():
            if len(where) > 1:
                name = f"{path}.{key}" if path else key
                found.append(f"{name}: key written {len(where)} times, on lines {', '.join(map(str, where))}; write each key once")
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found += duplicate_keys(item, f"{path}[{index}]")
    return found


class DuplicateKeyError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def read_yaml(text: str) -> Any:
    """The document in ``text``, built with YAML's safe constructor; ``DuplicateKeyError`` lists every repeated key.

    ``yaml.YAMLError`` for text that is not YAML, as ``safe_load`` raises it.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        problems = duplicate_keys(node)
        if problems:
            raise DuplicateKeyError(problems)
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
