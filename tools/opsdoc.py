"""Keep the settings table of docs/OPERATIONS.md in step with server/config.py.

python -m pigeon.tools.opsdoc docs/OPERATIONS.md          # rewrite the table
python -m pigeon.tools.opsdoc --check docs/OPERATIONS.md  # fail if stale
"""

from __future__ import annotations

import sys

from pigeon.server.config import grouped_fields_doc
from pigeon.tools.protodoc import _MARK


def config_table() -> str:
    """One table per group of settings, in the groups and order of ``pigeon serve --help``."""
    out = []
    for group, fields in grouped_fields_doc():
        title = group.title[0].upper() + group.title[1:]
        out += [f"### {title}", "", f"{group.description[0].upper()}{group.description[1:]}.", ""]
        out += ["| key / flag | value | default | meaning |", "|---|---|---|---|"]
        for name, metavar, default, help_ in fields:
            shown = "(none)" if default is None else f"`{default!r}`".replace("'", '"')
            if isinstance(default, bool):
                shown = f"`{str(default).lower()}`"  # as TOML and the flags spell it
            cell = metavar.replace("|", "\\|")  # a bare | would end the table cell
            out.append(f"| `{name}` | `{cell}` | {shown} | {help_.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def render(text: str) -> str:
    def sub(m):
        if m.group("name") != "config":
            raise KeyError(f"unknown generated section {m.group('name')!r}")
        return m.group(1) + config_table() + m.group(4)

    return _MARK.sub(sub, text)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    if len(paths) != 1:
        print("usage: python -m pigeon.tools.opsdoc [--check] docs/OPERATIONS.md", file=sys.stderr)
        return 2
    with open(paths[0], encoding="utf-8") as f:
        text = f.read()
    if "<!-- BEGIN config -->" not in text:
        print(f"{paths[0]}: no <!-- BEGIN config --> marker", file=sys.stderr)
        return 1
    new = render(text)
    if check:
        if new != text:
            print(f"{paths[0]} is out of date: run python -m pigeon.tools.opsdoc {paths[0]}",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
