"""YAML files as recipes and study plans read them: YAML 1.2 floats (`1e-3` is a number), no
key set twice in one mapping, and an unreadable file reported in one line."""
from __future__ import annotations

import re
from pathlib import Path

import yaml


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that build Python objects) reading floats as YAML 1.2
    does: YAML 1.1 wants a dot and a signed exponent, so `1e-3` would load as a string."""


# YAML 1.2's float (a dot or an exponent required, so integers stay integers), plus 1.1's
# `_` digit separators; in the float resolver's own slot, so it is still tried before int.
_FLOAT_TAG = "tag:yaml.org,2002:float"
_YAML12_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, _YAML12_FLOAT if tag == _FLOAT_TAG else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


class UnreadableYaml(ValueError):
    """A file that is not UTF-8 or not valid YAML; the message says which and where."""


class DuplicateKey(UnreadableYaml):
    """A key set twice in one mapping (PyYAML would silently keep the last one)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


def read_yaml_file(path: Path):
    """parse_yaml of a file, or UnreadableYaml in one line (recipes, study plans)."""
    try:
        return parse_yaml(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UnreadableYaml(f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                             f"{err.start}); expected YAML") from None
    except yaml.YAMLError as err:
        raise UnreadableYaml(f"not valid YAML: {yaml_error_line(err)}") from None


def yaml_error_line(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text spans several)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    return " ".join((f"{where}{what}" + (f" ({context})" if context else "")).split())


def parse_yaml(text: str):
    """Load YAML text with RecipeLoader, refusing a key set twice in one mapping (PyYAML
    silently keeps the last one). None for an empty document."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, prefix="", visited=set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node, prefix: str, visited: set) -> None:
    if id(node) in visited:  # an alias seen before (anchors may even nest themselves)
        return
    visited.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, prefix, visited)
    elif isinstance(node, yaml.MappingNode):
        first_line = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key in first_line:
                lines = (f"line {line}" if line == first_line[key]
                         else f"lines {first_line[key]} and {line}")
                raise DuplicateKey(f"{prefix}{key}", f"set twice, on {lines}; expected each "
                                                     "key once")
            first_line[key] = line
            _refuse_duplicate_keys(value_node, f"{prefix}{key}.", visited)
