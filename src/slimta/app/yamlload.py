"""YAML loading for the slimta config: PyYAML's safe loader with ``!include``, ``!env`` and lines.

* ``!include other.yaml`` is replaced by that file's content; the path is
  relative to the including file. A file that includes itself, directly or
  through others, is an error, as is a missing file.
* ``!env VAR`` is the environment variable's value (a string); ``!env
  VAR:default`` gives ``default`` when it is not set. Not set and no
  default is an error.
* ``!!python/name:sys.stdout`` (seen in logging configs written for the
  original slimta) becomes the string ``ext://sys.stdout``, which
  :func:`logging.config.dictConfig` resolves; nothing is imported here.
* Anchors, aliases and merge keys (``<<: *base``) work as YAML has them.
  A key given twice in one mapping is an error.

Mappings load as :class:`LineDict` and sequences as :class:`LineList`: plain
``dict``/``list`` subclasses that remember the file and line of every key
and item, so that errors found later can name them.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import yaml

__all__ = ["ConfigError", "LineDict", "LineList", "Mark", "Problem", "load_yaml"]


class Mark(NamedTuple):
    """A place in a config file: the file name as shown to the user and a 1-based line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class Problem(NamedTuple):
    """One error in a config: where, which key (``edge.inbound.queue``), what."""

    mark: Mark | None
    path: str
    message: str

    def __str__(self) -> str:
        parts = [str(self.mark)] if self.mark else []
        if self.path:
            parts.append(self.path)
        parts.append(self.message)
        return ": ".join(parts)


class ConfigError(Exception):
    """The config could not be loaded; ``problems`` lists each error (one a line)."""

    def __init__(self, problems: list[Problem] | Problem):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class LineDict(dict):
    """A mapping from YAML: ``mark`` is where it starts, ``key_marks[key]`` each key."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mark: Mark | None = None
        self.key_marks: dict[Any, Mark] = {}


class LineList(list):
    """A sequence from YAML: ``mark`` is where it starts, ``item_marks[i]`` each item."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.mark: Mark | None = None
        self.item_marks: list[Mark] = []


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """A SafeLoader for one file; ``stack`` holds the real paths of the files including it."""

    def __init__(self, text: str, name: str, stack: tuple[str, ...], names: tuple[str, ...]):
        super().__init__(text)
        self.name = name  # what marks (and so error messages) call this file
        self.stack = stack
        self.names = names

    def mark_of(self, node: yaml.Node) -> Mark:
        return Mark(self.name, node.start_mark.line + 1)


def _construct_map(loader: _Loader, node: yaml.MappingNode):
    data = LineDict()
    data.mark = loader.mark_of(node)
    yield data
    seen: dict[Any, Mark] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(Problem(loader.mark_of(key_node), "",
                                      f"key {key!r} given twice (first on line {seen[key].line})"))
        seen[key] = loader.mark_of(key_node)
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:
            raise ConfigError(Problem(loader.mark_of(key_node), "",
                                      "a mapping key must be a scalar")) from None
        data[key] = loader.construct_object(value_node)
        data.key_marks[key] = loader.mark_of(key_node)


def _construct_seq(loader: _Loader, node: yaml.SequenceNode):
    data = LineList()
    data.mark = loader.mark_of(node)
    yield data
    for item in node.value:
        data.append(loader.construct_object(item))
        data.item_marks.append(loader.mark_of(item))


def _construct_include(loader: _Loader, node: yaml.Node) -> Any:
    rel = _scalar(loader, node, "!include")
    mark = loader.mark_of(node)
    base = os.path.dirname(loader.stack[-1]) if loader.stack else ""
    path = os.path.join(base, os.path.expanduser(rel))
    name = os.path.normpath(os.path.join(os.path.dirname(loader.name), rel))
    real = os.path.realpath(path)
    if real in loader.stack:
        cycle = [*loader.names[loader.stack.index(real):], name]
        raise ConfigError(Problem(mark, "", f"!include {rel}: include cycle: "
                                  + " -> ".join(cycle)))
    return _load(path, name, (*loader.stack, real), (*loader.names, name), mark, rel)


def _construct_env(loader: _Loader, node: yaml.Node) -> str:
    spec = _scalar(loader, node, "!env").strip()
    var, sep, default = spec.partition(":")
    if not var:
        raise ConfigError(Problem(loader.mark_of(node), "", "!env needs a variable name"))
    value = os.environ.get(var)
    if value is not None:
        return value
    if sep:
        return default
    raise ConfigError(Problem(loader.mark_of(node), "",
                              f"!env {var}: not set, and no default (!env {var}:default)"))


def _construct_python_name(loader: _Loader, suffix: str, node: yaml.Node) -> str:
    return "ext://" + suffix


def _scalar(loader: _Loader, node: yaml.Node, tag: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(Problem(loader.mark_of(node), "", f"{tag} takes a single value"))
    return str(loader.construct_scalar(node))


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)
_Loader.add_constructor("!include", _construct_include)
_Loader.add_constructor("!env", _construct_env)
_Loader.add_multi_constructor("tag:yaml.org,2002:python/name:", _construct_python_name)


def _load(path: str, name: str, stack: tuple[str, ...], names: tuple[str, ...],
          included_at: Mark | None = None, rel: str | None = None) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if included_at is not None:
            raise ConfigError(Problem(included_at, "", f"!include {rel}: {reason.lower()}")) \
                from None
        raise ConfigError(Problem(None, "", f"{name}: {reason.lower()}")) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(Problem(Mark(name, 1), "", f"not UTF-8 text ({exc.reason})")) from None
    loader = _Loader(text, name, stack, names)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Mark(mark.name, mark.line + 1) if mark else Mark(name, 1)
        message = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            message = f"{exc.problem} ({exc.context})"
        raise ConfigError(Problem(where, "", message)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(Problem(Mark(name, 1), "", str(exc))) from None
    finally:
        loader.dispose()


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """The data in the YAML file at ``path``, with includes and variables resolved.

    Raises :class:`ConfigError` naming the file and line of the problem.
    """
    name = os.fspath(path)
    return _load(name, name, (os.path.realpath(name),), (name,))
