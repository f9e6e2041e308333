#!/usr/bin/env python
"""Write the option table of docs/configuration.md from `flax_bert.run.config.RunConfig`.

The table lists every field of the dataclass (name, type, default, choices, help text from the
field metadata), grouped under the `# ---- section` comments of its source, and replaces whatever
lies between the two marker lines in docs/configuration.md. The rest of that file is written by
hand and kept. Run it after changing RunConfig:

    python docs/make_configuration_reference.py          # rewrite the table
    python docs/make_configuration_reference.py --check  # exit 1 when the table is out of date
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import pathlib
import re
import sys
import typing

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's flax_bert, even when another one is installed

from flax_bert.run.config import SECRET_FIELDS, RunConfig  # noqa: E402

TARGET = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN GENERATED OPTIONS: python docs/make_configuration_reference.py -->"
END = "<!-- END GENERATED OPTIONS -->"
_SECTION = re.compile(r"^\s*#\s*-{2,}\s*(.+?)\s*$")
_FIELD = re.compile(r"^\s*(\w+)\s*:")


def sections() -> list[tuple[str, list[dataclasses.Field]]]:
    """Fields in source order under the `# ---- name` comment that precedes them."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    groups: list[tuple[str, list[dataclasses.Field]]] = [("options", [])]
    for line in inspect.getsource(RunConfig).splitlines():
        if heading := _SECTION.match(line):
            groups.append((heading.group(1), []))
        elif (name := _FIELD.match(line)) and name.group(1) in fields:
            groups[-1][1].append(fields.pop(name.group(1)))
    if fields:  # a field the source scan missed still gets documented
        groups.append(("other", list(fields.values())))
    return [(title, members) for title, members in groups if members]


def type_name(field: dataclasses.Field) -> str:
    hint = typing.get_type_hints(RunConfig)[field.name]
    kinds = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    return getattr(kinds[0], "__name__", str(kinds[0]))


def default_text(field: dataclasses.Field) -> str:
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table() -> str:
    lines = []
    for title, members in sections():
        lines += [f"### {title[0].upper()}{title[1:]}", "",
                  "| Option | Type | Default | Description |", "|---|---|---|---|"]
        for field in members:
            help_text = field.metadata.get("help", "")
            choices = field.metadata.get("choices")
            if choices:
                help_text += "; one of " + ", ".join(f"`{c}`" for c in choices)
            if field.name in SECRET_FIELDS:
                help_text += " (left out of every saved config)"
            lines.append(f"| `--{field.name}` | {type_name(field)} | {default_text(field)} | {cell(help_text)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render(current: str) -> str:
    if BEGIN not in current or END not in current:
        raise SystemExit(f"{TARGET} has no {BEGIN!r} ... {END!r} block to fill")
    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{table()}\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the table is up to date")
    args = parser.parse_args(argv)
    current = TARGET.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{TARGET} is out of date: run python docs/make_configuration_reference.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    print(f"wrote the option table of {TARGET} ({len(dataclasses.fields(RunConfig))} options)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
