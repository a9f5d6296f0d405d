"""Read a YAML file safely and remember the line of every key, so errors can point at it."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, ConfigErrors

Path_ = tuple[str | int, ...]


def read_pipeline_text(path: Path) -> str:
    """The file's text, or a ConfigError that says what is wrong with the path itself."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = " (a symbolic link to a file that does not exist)" if path.is_symlink() else ""
        raise ConfigError(f"file not found{hint}; check the path", file=str(path)) from None
    except IsADirectoryError:
        raise ConfigError("is a directory; pass the pipeline's YAML file, e.g. pipelines/quickstart.yaml",
                          file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8",
                          file=str(path)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError("is a loop of symbolic links; point at the pipeline's real file", file=str(path)) \
                from None
        # Permission denied, an I/O error, ...: the OS's own words name the cause.
        raise ConfigError(f"cannot read the file: {(exc.strerror or str(exc)).lower()}; fix the path or its "
                          "permissions", file=str(path)) from None


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[Path_, int]]:
    """Return (data, lines) where lines maps a key path like ("stages", 1, "samples") to its 1-based line."""
    text = read_pipeline_text(path)
    try:
        # compose() builds nodes with positions using the safe loader; no Python objects are constructed.
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None:
            problem += f" ({context} started at line {context_mark.line + 1})"
        raise ConfigError(f"malformed YAML: {problem}; fix the syntax (indentation, quotes, colons)",
                          file=str(path), line=mark.line + 1 if mark else None) from None
    lines: dict[Path_, int] = {}
    duplicates: list[ConfigError] = []
    if node is not None:
        _walk(node, (), lines, duplicates, str(path))
    if duplicates:
        raise ConfigErrors(duplicates)
    return data, lines


def _walk(node: yaml.Node, path: Path_, lines: dict[Path_, int], duplicates: list[ConfigError], file: str) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            # YAML lets the last of two equal keys win without a word: the first value would be silently lost.
            # (`<<` is the merge key, which may repeat; non-scalar keys cannot be compared by text.)
            if isinstance(key_node, yaml.ScalarNode) and key != "<<":
                identity = (key_node.tag, key)
                if identity in first_line:
                    where = ".".join(str(p) for p in (*path, key))
                    duplicates.append(ConfigError(
                        f"duplicate key {key!r} (also at line {first_line[identity]}); the second would silently "
                        "replace the first: keep one" + (" (two models cannot share a name)"
                                                         if path == ("models",) else ""),
                        file=file, line=line, field=where))
                    continue
                first_line[identity] = line
            lines[path + (key,)] = line
            _walk(value_node, path + (key,), lines, duplicates, file)
            lines[path + (key,)] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, duplicates, file)


def line_for(lines: dict[Path_, int], path: Path_) -> int | None:
    """The line of `path`, or of its nearest ancestor that has one."""
    path = tuple(path)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())
