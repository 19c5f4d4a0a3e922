"""What every benchmark's command line shares: its parser, its work folder and its JSON report."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import orjson


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of the module's docstring."""
    description = doc.split("\n\n")[0]
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def work_dir(stack: contextlib.ExitStack, given: Path | None, prefix: str) -> Path:
    """``given`` (created if needed), or a temporary folder removed when ``stack`` closes."""
    if given is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    given.mkdir(parents=True, exist_ok=True)
    return given.resolve()


def emit(report: dict[str, Any], out: Path | None, summary: str) -> None:
    """Print the report as JSON (and write it to ``out``), then its one-line summary."""
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    if out is not None:
        out.write_text(text + "\n")
    print(text)
    print(summary)
