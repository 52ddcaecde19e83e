"""Where the commands may write: the checks every command runs on an output path before it writes anything."""

from __future__ import annotations

import os


def file_in_the_way(path: str) -> str | None:
    """The regular file that stops a folder from being made at `path` (the path itself or a parent), or None."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return None if os.path.isdir(existing) else existing
