"""Print one of the README's set-up commands, so CI runs exactly what the README says.

    python3 tools/readme_command.py install   # the first command: install and stream text
    python3 tools/readme_command.py test      # the second: install the test extras and run pytest

The commands are the first two ```bash blocks under "## Set up and run" in README.md, in that
order; each block must hold one command (a line ending in a backslash continues it). Standard
library only: CI runs this before anything is installed.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
NAMES = ("install", "test")


def setup_commands(text: str) -> list[str]:
    """The ```bash blocks of the "## Set up and run" section, each joined into one line."""
    m = re.search(r"^## Set up and run\n(.*?)(?=^## )", text, re.S | re.M)
    if m is None:
        raise SystemExit("readme_command: README.md has no '## Set up and run' section")
    blocks = re.findall(r"^```bash\n(.*?)^```", m.group(1), re.S | re.M)
    cmds = []
    for b in blocks:
        lines = [l for l in b.splitlines() if l.strip() and not l.lstrip().startswith("#")]
        cmd = " ".join(l.rstrip().removesuffix("\\").strip() for l in lines)
        if any(not l.rstrip().endswith("\\") for l in lines[:-1]):
            raise SystemExit(f"readme_command: a set-up block holds more than one command:\n{b}")
        cmds.append(cmd)
    return cmds


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in NAMES:
        print(f"usage: readme_command.py {{{'|'.join(NAMES)}}}", file=sys.stderr)
        return 2
    cmds = setup_commands(README.read_text(encoding="utf-8"))
    i = NAMES.index(argv[0])
    if len(cmds) <= i:
        print(f"readme_command: README.md's set-up section has {len(cmds)} bash blocks; "
              f"expected {len(NAMES)}", file=sys.stderr)
        return 1
    print(cmds[i])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
