"""Print the one ```bash block of README.md that contains a marker, so CI runs README's commands as
written (`python3 .ci/readme_block.py MARKER`); tests/test_readme.py reads them the same way.
Standard library only: CI runs it before any venv exists."""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str, readme: Path = README) -> str:
    blocks = [block for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S) if marker in block]
    if len(blocks) != 1:
        raise LookupError(f"README.md has {len(blocks)} bash blocks containing {marker!r}; CI needs exactly one")
    return blocks[0]


if __name__ == "__main__":
    try:
        print(readme_block(sys.argv[1]), end="")
    except LookupError as error:
        sys.exit(str(error))
