"""docs/design.md §3 names every module of the server and the SDK, so its tree cannot drift.

The tree is the section's indented block: each line's first word is a file or a folder (ending
in ``/``), its indentation says which folder above it holds it. Every ``*.py`` under
server/adjointdpm_server/ and sdk/adjointdpm/ except ``__init__.py`` and the generated
sdk/adjointdpm/v1/ must appear there, at its path; a module the tree names must exist.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
PACKAGES = ("server/adjointdpm_server/", "sdk/adjointdpm/")
GENERATED = "sdk/adjointdpm/v1/"


def section_3(text: str) -> str:
    """The text between the ``## 3.`` heading and the next ``## `` heading."""
    match = re.search(r"^## 3\.[^\n]*\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "docs/design.md has no '## 3.' section followed by another '## ' heading"
    return match.group(1)


def tree_paths(section: str) -> set[str]:
    """Repository paths the section's tree names (lines indented by 4+ spaces)."""
    folders: list[tuple[int, str]] = []  # (indentation, name) of the folders above this line
    paths = set()
    for line in section.splitlines():
        if not line.startswith("    ") or not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        while folders and folders[-1][0] >= indent:
            folders.pop()
        paths.add("".join(folder for _, folder in folders) + name)
        if name.endswith("/"):
            folders.append((indent, name))
    return paths


def modules() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if path.name != "__init__.py" and not rel.startswith(GENERATED):
                found.add(rel)
    return found


def test_the_layering_tree_names_every_module():
    named = tree_paths(section_3(DESIGN.read_text(encoding="utf-8")))
    missing = sorted(modules() - named)
    assert not missing, ("docs/design.md §3 (Layering) does not name these modules; add a line for "
                         "each to the tree, under its folder:\n  " + "\n  ".join(missing))


def test_the_layering_tree_names_no_missing_module():
    named = tree_paths(section_3(DESIGN.read_text(encoding="utf-8")))
    stale = sorted(p for p in named if p.endswith(".py") and p.startswith(PACKAGES)
                   and not (ROOT / p).is_file())
    assert not stale, ("docs/design.md §3 (Layering) names modules that do not exist:\n  "
                       + "\n  ".join(stale))
