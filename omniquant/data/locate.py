"""Find a shipped data set (calibration set, task set) by name, or take a directory.

Policy (one rule for every kind of set):
    1. A name of a shipped set resolves to ``<root>/<name>``. Write a local directory
       of the same name as a path (``./omni-mix``) to use it instead.
    2. Anything else must be a directory holding the set's index file.
    3. The root is the environment variable's value when set, else the shipped
       directory of that kind (``omniquant.data.shipped``: the checkout's top-level
       directory for an editable install, the wheel's copy for a wheel).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from omniquant.data.shipped import shipped_dir
from omniquant.errors import DataError


@dataclass(frozen=True)
class SetLocator:
    """Where sets of one kind live and how they are recognised.

    Attributes:
        kind: Human name used in messages ("calibration set", "task set").
        env: Environment variable overriding the root.
        dirname: Top-level repository directory holding the shipped sets.
        index: File that makes a directory a set (``manifest.jsonl``, ``tasks.jsonl``).
        hint: What the index file holds, for error messages.
    """

    kind: str
    env: str
    dirname: str
    index: str
    hint: str

    def root(self) -> Path:
        override = os.environ.get(self.env)
        return Path(override) if override else shipped_dir(self.dirname)

    def shipped(self) -> list[str]:
        """Names of the shipped sets, sorted."""
        root = self.root()
        if not root.is_dir():
            return []
        return sorted(d.name for d in root.iterdir() if (d / self.index).is_file())

    def resolve(self, name_or_dir: str | Path) -> Path:
        """Resolve a shipped name or a directory to the set's absolute directory.

        Raises:
            DataError: Neither a shipped name nor a directory with the index file; the
                message lists the shipped names.
        """
        shipped = self.shipped()
        text = str(name_or_dir)
        if isinstance(name_or_dir, str) and text in shipped:
            return (self.root() / text).resolve()
        path = Path(name_or_dir)
        if path.is_dir():
            if not (path / self.index).is_file():
                raise DataError(
                    f"{self.kind.capitalize()} directory {path} has no {self.index}; a "
                    f"{self.kind} is a directory with {self.hint} in {self.index}."
                )
            return path.resolve()
        names = ", ".join(shipped) if shipped else f"none found under {self.root()}"
        raise DataError(
            f"Unknown {self.kind} {text!r}: it is neither a shipped set nor a directory. "
            f"Shipped sets: {names}. Or pass a directory with a {self.index}."
        )
