"""Paths confined to a folder: no absolute paths, no `..`, no symlink leading out."""

from __future__ import annotations

import os
from pathlib import Path

from sd3fp8.workflow.types import NodeError


class PathEscape(NodeError):
    """A user-supplied name points outside the folder it must stay in."""


def confined(root: Path, *parts: str) -> Path:
    """``root / parts...`` resolved (symlinks followed), refused unless it stays inside ``root``.

    Raises PathEscape for absolute parts, `..` components, NUL bytes and symlink escapes."""
    root = Path(root).resolve()
    for part in parts:
        if "\x00" in part:
            raise PathEscape("a file name may not contain NUL")
        if os.path.isabs(part) or part.startswith(("/", "\\")) or (len(part) > 1 and part[1] == ":"):
            raise PathEscape(f"absolute paths are not allowed: {part!r}")
        if ".." in Path(part.replace("\\", "/")).parts:
            raise PathEscape(f"'..' is not allowed in {part!r}")
    path = root.joinpath(*[p for p in parts if p]).resolve()
    if path != root and root not in path.parents:
        raise PathEscape("the path leads outside its folder")
    return path


def split_annotation(name: str, default: str = "input") -> tuple[str, str]:
    """ComfyUI's annotated names: ``"x.png [output]"`` -> ("x.png", "output")."""
    for kind in ("input", "output", "temp"):
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, default
