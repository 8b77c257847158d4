"""``opdsl bench [SPEC ...] [options]``: runs ``benchmarks/step.py`` of a source checkout.

Leading spec names (shipped names or YAML paths) become ``--specs``; every option is step.py's
(``opdsl bench --help`` lists them).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "step_arguments"]


def _script() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = root / "benchmarks" / "step.py"
        if candidate.is_file():
            return candidate
    return None


def step_arguments(argv: Sequence[str]) -> list[str]:
    """``opdsl bench`` arguments as step.py's: leading spec names become ``--specs NAME ...``."""
    argv = list(argv)
    specs = []
    while argv and not argv[0].startswith("-"):
        specs.append(argv.pop(0))
    return ["--specs", *specs, *argv] if specs else argv


def main(argv: Sequence[str]) -> int:
    script = _script()
    if script is None:
        print("opdsl bench needs a source checkout (benchmarks/step.py); run it from the repository root", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [str(script), *step_arguments(argv)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = saved
    return 0
