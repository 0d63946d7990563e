"""Make the NGC container's pip constraints agree with the packages Pare installs.

NGC PyTorch images (25.03 and later) pin every Python package they ship in
/etc/pip/constraint.txt, and their release notes say to remove a package's line there to install
another version. This removes the lines of the packages in Pare's requirements file and appends
Pare's pins (uv.lock's versions), so the install in the Dockerfile, and any later `pip install` in
the image, keeps them, while everything else (torch, Transformer Engine, apex, ...) stays pinned
at the container's versions. It prints each pin it changes: the packages that must differ.

    python docker/constrain.py docker/requirements.txt [/etc/pip/constraint.txt]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def name(line: str) -> str | None:
    """The normalized (PEP 503) project name a requirement line starts with; None for comments,
    blank lines and options."""
    m = _NAME.match(line)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else None


def constrain(constraints: str, requirements: str) -> tuple[str, list[str]]:
    """``constraints`` with the lines of the packages in ``requirements`` replaced by its pins;
    returns the new text and ``"old -> new"`` for each pin that changed."""
    pins = {name(line): line.strip() for line in requirements.splitlines() if name(line)}
    kept, changed = [], []
    for line in constraints.splitlines():
        n = name(line)
        if n in pins:
            if line.split(";")[0].strip() != pins[n].split(";")[0].strip():
                changed.append(f"{line.strip()} -> {pins[n]}")
        else:
            kept.append(line)
    text = "\n".join(kept + ["# Pare: docker/requirements.txt (uv.lock's versions)", *pins.values()])
    return text + "\n", changed


def main(requirements: str, constraints: str = "/etc/pip/constraint.txt") -> None:
    path = Path(constraints)
    if not path.exists():
        print(f"{path} does not exist: no pip constraints to update")
        return
    text, changed = constrain(path.read_text(), Path(requirements).read_text())
    path.write_text(text)
    print(f"{path}: {len(changed)} container pins replaced by uv.lock's")
    for c in changed:
        print("  " + c)


if __name__ == "__main__":
    main(*sys.argv[1:])
