"""One number per meaning: every exit code is defined in editd/exitcodes.py, and README's
table lists exactly those."""

from __future__ import annotations

import re
from pathlib import Path

from editd import exitcodes

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_lists_exactly_the_codes_the_process_can_end_with() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("Every command exits with a code") :]
    section = section[: section.index("\n\n", section.index("| code | meaning |"))]
    listed = [int(m) for m in re.findall(r"^\| (\d+) \|", section, flags=re.MULTILINE)]
    assert listed == sorted(exitcodes.ALL)
    names = {n for n in dir(exitcodes) if n.startswith("EXIT_")}
    assert {getattr(exitcodes, n) for n in names} == set(exitcodes.ALL)
    assert len(names) == len(exitcodes.ALL)  # no two names for one code


def test_no_module_defines_its_own_exit_codes() -> None:
    own = re.compile(r"^EXIT_[A-Z_]+ = \d+", flags=re.MULTILINE)
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "editd").rglob("*.py")
        if path.name != "exitcodes.py" and own.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
