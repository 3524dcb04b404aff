"""Source layout rules that review would otherwise have to catch by eye."""
from pathlib import Path

import qround

MAX_LINE = 100


def test_package_lines_fit_in_100_characters():
    root = Path(qround.__file__).parent
    long = [f"{path.relative_to(root)}:{i}" for path in sorted(root.rglob("*.py"))
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if len(line) > MAX_LINE]
    assert not long, f"lines over {MAX_LINE} characters: {long}"
