"""MkDocs hook: render the CLI reference from `diffusekit.cli.build_parser()` at build time.

A page containing the marker `<!-- cli-reference -->` gets it replaced by one section per command,
walked recursively from the argparse parser, so subcommands added later appear without editing docs.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterator
from pathlib import Path

MARKER = "<!-- cli-reference -->"
SRC = Path(__file__).resolve().parents[2] / "src"


def _parser() -> argparse.ArgumentParser:
    """The CLI's parser, imported from this checkout's src/ first."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from diffusekit.cli import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each direct subcommand, in definition order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # an alias of a command already listed
                    continue
                seen.add(id(sub))
                yield name, helps.get(name, ""), sub


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """Every command below `parser` (depth first) as (words after `diffusekit`, help, parser)."""
    for name, help_text, sub in _subcommands(parser):
        yield (*path, name), help_text, sub
        yield from walk(sub, (*path, name))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage block at a fixed width, so the page does not depend on the terminal."""
    formatter_class = parser.formatter_class
    parser.formatter_class = functools.partial(formatter_class, width=88)
    try:
        return parser.format_usage().strip()
    finally:
        parser.formatter_class = formatter_class


def _default(action: argparse.Action) -> str:
    if action.default in (None, False, argparse.SUPPRESS) or action.required:
        return ""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return ""
    return f"`{action.default}`"


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            name = ", ".join(f"`{s}`" for s in action.option_strings)
            if action.nargs != 0:
                name += f" `{action.metavar or action.dest.upper()}`"
        else:
            name = f"`{action.metavar or action.dest}`"
        help_text = _cell(action.help or "")
        if help_text and help_text[-1] not in ".!?)":
            help_text += "."
        if action.choices is not None:
            choices = ", ".join(f"`{c}`" for c in action.choices)
            help_text += (" " if help_text else "") + f"One of: {choices}."
        if action.required and action.option_strings:
            help_text = "**Required.** " + help_text
        rows.append(f"| {name} | {_default(action)} | {help_text} |")
    if not rows:
        return []
    return ["| argument | default | description |", "|---|---|---|", *rows, ""]


def _section(words: tuple[str, ...], help_text: str, parser: argparse.ArgumentParser) -> list[str]:
    command = " ".join(("diffusekit", *words))
    level = "#" * min(2 + len(words) - 1, 4)
    lines = [f"{level} `{command}`", ""]
    description = parser.description or help_text
    if description:
        lines += [_cell(description), ""]
    lines += ["```text", _usage(parser), "```", ""]
    lines += _arguments_table(parser)
    subs = list(_subcommands(parser))
    if subs:
        lines += ["Subcommands:", ""]
        lines += [f"- `{command} {name}`: {_cell(h)}" for name, h, _ in subs]
        lines.append("")
    return lines


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole reference as Markdown: the top-level command, then every subcommand."""
    parser = parser or _parser()
    lines = ["## `diffusekit`", "", _cell(parser.description or ""), ""]
    lines += ["```text", _usage(parser), "```", ""]
    lines += _arguments_table(parser)
    commands = list(walk(parser))
    lines += ["| command | what it does |", "|---|---|"]
    lines += [f"| [`{' '.join(w)}`](#{'-'.join(('diffusekit', *w))}) | {_cell(h)} |" for w, h, _ in commands]
    lines.append("")
    for words, help_text, sub in commands:
        lines += _section(words, help_text, sub)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs hook signature)
    """Replace the marker with the generated reference."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
