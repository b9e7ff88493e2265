#!/usr/bin/env python3
"""Module and function sizes under src/: the longest ones, and those past the limits (~400 lines a
module, ~60 a function). Usage: scripts/sizes.py [--top N] [--strict]  (--strict: exit 1 past a limit)."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

MODULE_LIMIT, FUNCTION_LIMIT = 400, 60
ROOT = Path(__file__).resolve().parent.parent / "src"


def sizes() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    modules, functions = [], []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        modules.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}"))
    return sorted(modules, reverse=True), sorted(functions, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args()
    modules, functions = sizes()
    over = [m for m in modules if m[0] > MODULE_LIMIT] + [f for f in functions if f[0] > FUNCTION_LIMIT]
    print("longest modules:", *(f"  {n:4d}  {name}" for n, name in modules[: args.top]), sep="\n")
    print("longest functions:", *(f"  {n:4d}  {name}" for n, name in functions[: args.top]), sep="\n")
    print(f"past the limits ({MODULE_LIMIT} / {FUNCTION_LIMIT} lines):", *(f"  {n:4d}  {name}" for n, name in over) or ["  none"], sep="\n")
    return 1 if args.strict and over else 0


if __name__ == "__main__":
    sys.exit(main())
