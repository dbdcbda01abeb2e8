"""The settings reference, ``docs/SETTINGS.md``, rendered from :class:`~tinkerkit.config.TrainConfig`.

Each field of ``TrainConfig`` becomes one row: its UPPERCASE name (as config files and ``--set``
spell it), its default, the values it accepts (from the field's type and bounds) and its
``description``. Fields are grouped under the ``# Group`` comments that head them in the class
body. Only the part of ``docs/SETTINGS.md`` between :data:`BEGIN` and :data:`END` is generated;
the prose around it is written by hand. ``tests/test_settings_doc.py`` fails when that part
differs from what this module renders, so the table cannot drift from the config.

    python -m tinkerkit.settings_doc            # rewrite the generated part of docs/SETTINGS.md
    python -m tinkerkit.settings_doc --check    # exit status 1 when it is out of date
"""

from __future__ import annotations

import argparse
import enum
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tinkerkit.config import TrainConfig
from tinkerkit.sampling_rules import SAMPLING_SETTINGS, rule_of

SETTINGS_MD = Path(__file__).resolve().parents[2] / "docs" / "SETTINGS.md"
"""``docs/SETTINGS.md`` of the source checkout this module belongs to."""
REGENERATE = "python -m tinkerkit.settings_doc"
"""The command that rewrites the generated part (named in the test's failure message)."""
BEGIN = "<!-- BEGIN GENERATED: python -m tinkerkit.settings_doc (edit TrainConfig, not this table) -->"
END = "<!-- END GENERATED -->"

FACTORY_DEFAULTS = {"tinker_base_url": "`$TINKER_BASE_URL`"}
"""How a default computed when the config is built (``default_factory``) is shown, where calling
the factory would write this machine's environment into the document."""


def field_groups(model: type = TrainConfig) -> list[tuple[str, list[str]]]:
    """``(group title, field names)`` in class order; a group is the ``# Title`` comment line
    at class-body indentation that precedes its fields (``Settings`` before any comment)."""
    groups: list[tuple[str, list[str]]] = [("Settings", [])]
    for line in inspect.getsource(model).splitlines():
        if comment := re.fullmatch(r" {4}# (.+)", line):
            groups.append((comment.group(1).strip(), []))
        elif (field := re.match(r" {4}(\w+)\s*:", line)) and field.group(1) in model.model_fields:
            groups[-1][1].append(field.group(1))
    listed = [name for _, names in groups for name in names]
    if sorted(listed) != sorted(model.model_fields):  # a field the source scan did not see
        missing = [name for name in model.model_fields if name not in listed]
        groups.append(("Other", missing))
    return [(title, names) for title, names in groups if names]


def render_value(value: Any) -> str:
    """A default as a config file writes it: ``None``, ``True``, ``"text"``, ``1e-08``, ``[]``."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    return repr(value)


def render_default(name: str, info: FieldInfo) -> str:
    """The Markdown cell of a field's default."""
    if name in FACTORY_DEFAULTS:
        return FACTORY_DEFAULTS[name]
    if info.default_factory is not None:
        value = info.default_factory()
        if value or not isinstance(value, (list, tuple, dict, set)):
            raise ValueError(f"{name}: a computed default needs its display in FACTORY_DEFAULTS")
    elif info.default is PydanticUndefined:
        return "(required)"
    else:
        value = info.default
    return f"`{render_value(value)}`"


def _render_type(annotation: Any) -> list[str]:
    """The alternatives a type accepts, as Markdown (``None`` last)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [p for arg in typing.get_args(annotation) for p in _render_type(arg)]
        return [p for p in parts if p != "None"] + (["None"] if "None" in parts else [])
    if origin is Literal:
        return [f"`{v}`" for v in typing.get_args(annotation)]
    if origin is list:
        (item,) = typing.get_args(annotation)
        return [f"list of {' or '.join(_render_type(item))}"]
    if annotation is type(None):
        return ["None"]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [f"`{member.value}`" for member in annotation]
    return [getattr(annotation, "__name__", str(annotation))]


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _render_bounds(info: FieldInfo) -> str:
    """``> 0``, ``≥ 0``, or an interval such as ``in [0, 1)``; empty without bounds."""
    lower = upper = None
    for item in info.metadata:
        if isinstance(item, annotated_types.Gt):
            lower = ("(", ">", item.gt)
        elif isinstance(item, annotated_types.Ge):
            lower = ("[", "≥", item.ge)
        elif isinstance(item, annotated_types.Lt):
            upper = (")", "<", item.lt)
        elif isinstance(item, annotated_types.Le):
            upper = ("]", "≤", item.le)
    if lower and upper:
        return f"in {lower[0]}{_number(lower[2])}, {_number(upper[2])}{upper[0]}"
    bound = lower or upper
    return f"{bound[1]} {_number(bound[2])}" if bound else ""


def render_values(info: FieldInfo) -> str:
    """The Markdown cell of the values a field accepts: its type or choices, and its bounds."""
    alternatives = _render_type(info.annotation)
    bounds = _render_bounds(info)
    if bounds:  # bounds apply to the one numeric alternative
        alternatives = [f"{a} {bounds}" if a in ("int", "float") else a for a in alternatives]
    if all(a.startswith("`") for a in alternatives) and len(alternatives) > 1:
        return ", ".join(alternatives[:-1]) + " or " + alternatives[-1]
    return " or ".join(alternatives)


def _cell(text: str) -> str:
    """One table cell: on one line, ``|`` escaped, and ``<``/``>`` outside code spans as
    entities (so ``runs/<timestamp>`` is not taken for an HTML tag)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def render_table(model: type = TrainConfig) -> str:
    """The generated part of ``docs/SETTINGS.md``: one table per group of fields."""
    out = []
    for title, names in field_groups(model):
        out += [f"### {title}", "", "| Setting | Default | Values | Meaning |", "|---|---|---|---|"]
        for name in names:
            info = model.model_fields[name]
            values = render_values(info)
            if name in SAMPLING_SETTINGS:  # checked by a validator, not by pydantic bounds
                values = f"{values}: {rule_of(name)}"
            out.append(f"| `{name.upper()}` | {_cell(render_default(name, info))} "
                       f"| {_cell(values)} | {_cell(info.description or '')} |")
        out.append("")
    return "\n".join(out)


def update(document: str, model: type = TrainConfig) -> str:
    """``document`` with the text between :data:`BEGIN` and :data:`END` rendered anew.

    Raises:
        ValueError: The document lacks either marker, or has them out of order.
    """
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"expected the lines {BEGIN!r} and then {END!r}")
    return document[:start + len(BEGIN)] + "\n\n" + render_table(model) + "\n" + document[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinkerkit.settings_doc",
                                     description="Render docs/SETTINGS.md's tables from TrainConfig.")
    parser.add_argument("--path", type=Path, default=SETTINGS_MD, help="default: %(default)s")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 when the file is out of date")
    args = parser.parse_args(argv)
    current = args.path.read_text(encoding="utf-8")
    expected = update(current)
    if args.check:
        if current != expected:
            print(f"{args.path} is out of date: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if current != expected:
        args.path.write_text(expected, encoding="utf-8")
        print(f"rewrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
