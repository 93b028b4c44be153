"""`tokenratio train --print-config`: a resolved Config as TOML, every key with its value (defaults
included) and the comment config.py gives it, so the output is itself a valid config file."""

import inspect
import json
import re
from dataclasses import fields, is_dataclass

from tokenratio.config import Config

_FIELD = re.compile(r"^(\w+):[^#]*(?:#\s*(.*))?$")


def field_comments(cls) -> dict[str, str]:
    """Each field's comment in the class source: the lines above it and the one on its line."""
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
        elif match := _FIELD.match(stripped):
            comments[match.group(1)] = " ".join([*above, match.group(2) or ""]).strip()
            above = []
        elif stripped and not stripped.startswith(('"""', ")", "(", '"')):
            above = []
    return comments


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return json.dumps(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def config_as_toml(config: Config) -> str:
    lines = []
    for section in fields(config):
        lines += section_as_toml(section.name, getattr(config, section.name))
    return "\n".join(lines)


def section_as_toml(name: str, part) -> list[str]:
    """One table's lines (and its nested tables', e.g. [study.eval]), a blank line after each."""
    comments = field_comments(type(part))
    lines, nested = [f"[{name}]"], []
    for f in fields(part):
        value = getattr(part, f.name)
        comment = f"  # {comments[f.name]}" if comments.get(f.name) else ""
        if value is None:  # TOML has no null: left unset
            lines.append(f"# {f.name} =  (unset){comment}")
        elif is_dataclass(value):
            nested += section_as_toml(f"{name}.{f.name}", value)
        else:
            lines.append(f"{f.name} = {toml_value(value)}{comment}")
    return [*lines, "", *nested]
