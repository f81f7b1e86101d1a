"""Sphinx configuration of emberfl's documentation (built by `.ci/run` with -W)."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from sphinx.application import Sphinx

import emberfl

project = "emberfl"
author = "emberfl contributors"
copyright = "emberfl contributors"  # noqa: A001 -- Sphinx's name
release = emberfl.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
html_title = f"emberfl {release}"

HERE = Path(__file__).resolve().parent


def _write_cli_reference(app: Sphinx) -> None:
    """docs/_generated/cli.md: every command's ``--help``, from the argument parser itself."""
    from emberfl.cli import build_parser

    parser = build_parser()
    parts = [
        "# Command line reference\n",
        "Generated from `emberfl.cli.build_parser()` when the documentation is built.\n",
        "## emberfl\n",
        "```text\n" + parser.format_help() + "```\n",
    ]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                parts.append(f"## emberfl {name}\n")
                parts.append("```text\n" + textwrap.dedent(sub.format_help()) + "```\n")
    out = HERE / "_generated" / "cli.md"
    out.parent.mkdir(exist_ok=True)
    text = "\n".join(parts)
    if not out.exists() or out.read_text() != text:
        out.write_text(text)


def setup(app: Sphinx) -> None:
    app.connect("builder-inited", _write_cli_reference)
