"""``opdsl bench``: runs ``benchmarks/step.py`` of a source checkout with the given arguments."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


def _script() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = root / "benchmarks" / "step.py"
        if candidate.is_file():
            return candidate
    return None


def main(argv: Sequence[str]) -> int:
    script = _script()
    if script is None:
        print("opdsl bench needs a source checkout (benchmarks/step.py); run it from the repository root", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = saved
    return 0
