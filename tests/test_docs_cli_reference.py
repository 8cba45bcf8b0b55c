"""The generated CLI reference page lists every command and option that `--help` shows."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffusekit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def _hook():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs/hooks/cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(words, parser) for every subcommand, nested ones included, read off the parser itself."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def _options_in_help(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings `--help` lists (not option-like words inside help prose, e.g. "kohya --x")."""
    shown = set(OPTION.findall(parser.format_help()))
    options = {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    assert options <= shown | {"-h"}, f"options missing from --help: {sorted(options - shown)}"
    return options


def _sections(page: str) -> dict[str, str]:
    """The page's text per command heading (`## \\`diffusekit x y\\``)."""
    parts = re.split(r"^#{2,4} `(diffusekit[^`]*)`$", page, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _page() -> str:
    """The CLI page exactly as the MkDocs build renders it (the hook applied to docs/reference/cli.md)."""
    source = (ROOT / "docs/reference/cli.md").read_text()
    assert _hook().MARKER in source
    return _hook().on_page_markdown(source, page=None, config=None, files=None)


def _check(parser: argparse.ArgumentParser, page: str) -> None:
    sections = _sections(page)
    top = sections["diffusekit"]
    for option in _options_in_help(parser):
        assert f"`{option}`" in top, f"{option} of `diffusekit --help` missing from the reference"
    commands = list(_commands(parser))
    assert commands, "the parser has no subcommands"
    for words, sub in commands:
        title = " ".join(("diffusekit", *words))
        assert title in sections, f"`{title}` has no section in the CLI reference"
        text = sections[title]
        for option in _options_in_help(sub):
            assert f"`{option}`" in text, f"{option} of `{title} --help` missing from its section"
        for action in sub._actions:  # positionals too, by the name --help shows
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
                assert f"`{action.metavar or action.dest}`" in text, (title, action.dest)


def test_reference_lists_every_command_and_option():
    _check(build_parser(), _page())


def test_every_command_of_the_help_text_is_in_the_reference():
    shown = subprocess.run(
        [sys.executable, "-m", "diffusekit.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    listed = re.findall(r"^    (\S+)\s", shown, flags=re.M)  # the COMMAND list of `diffusekit --help`
    sections = _sections(_page())
    assert len(listed) >= 10, shown
    for name in listed:
        assert f"diffusekit {name}" in sections, name


def test_a_command_added_later_appears_without_editing_docs():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    group = sub.add_parser("zzgroup", help="a command group added later")
    inner = group.add_subparsers(dest="zz", required=True)
    leaf = inner.add_parser("leaf", help="a nested command")
    leaf.add_argument("thing")
    leaf.add_argument("--flavour", choices=("a", "b"), default="a", help="which | kind")
    page = _hook().render(parser)
    _check(parser, page)
    assert "`diffusekit zzgroup leaf`" in page and "which \\| kind" in page


def test_the_check_fails_on_a_missing_option():
    parser = build_parser()
    page = _hook().render(parser)
    parser.add_argument("--not-an-option", help="added after rendering")
    with pytest.raises(AssertionError, match="--not-an-option"):
        _check(parser, page)
