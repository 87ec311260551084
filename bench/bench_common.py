"""What the benchmark scripts share: their folder off the import path (bench/query.py would shadow the `query`
package), sibling modules by path, the --quick option's defaults, and millisecond rounding."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from types import ModuleType

HERE = os.path.dirname(os.path.abspath(__file__))


def leave_bench_folder() -> None:
    """Drop this folder from sys.path, so `import query` finds the package, not bench/query.py."""
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]


def sibling(name: str) -> ModuleType:
    """The module bench/<name>.py, loaded by path."""
    spec = importlib.util.spec_from_file_location(f"refbank_bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_with_quick(parser: argparse.ArgumentParser, quick: dict, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv; with --quick, `quick` replaces the defaults (flags given explicitly still win)."""
    parser.add_argument("--quick", action="store_true", help=f"small configuration: {quick} (explicit flags win)")
    first, _ = parser.parse_known_args(argv)
    if first.quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def ms(seconds: float) -> float:
    """Seconds as milliseconds, 3 decimals."""
    return round(1000 * float(seconds), 3)
