"""docs/testing.md says which tests can skip and why: every file that can skip is in its list, and
the CUDA-only count it states is the number of tests in the CUDA file."""

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
DOC = (TESTS.parent / "docs" / "testing.md").read_text()


def _can_skip(path: Path) -> bool:
    text = path.read_text()
    return bool(re.search(r"pytest\.(skip\(|importorskip\(|mark\.skipif)", text))


def test_every_file_that_can_skip_is_listed():
    section = DOC.split("## Skips", 1)[1].split("\n\n| when |", 1)[0]
    listed = set(re.findall(r"^\| `(tests/[^`]+\.py)` \|", section, re.M))
    skipping = {str(p.relative_to(TESTS.parent)) for p in TESTS.rglob("*.py")
                if _can_skip(p) and p.name != Path(__file__).name}
    assert skipping == listed, (sorted(skipping - listed), sorted(listed - skipping))


def test_the_cuda_only_count_is_the_cuda_files_tests():
    tree = ast.parse((TESTS / "multiprocess" / "test_cuda.py").read_text())
    count = sum(isinstance(n, ast.FunctionDef) and n.name.startswith("test_") for n in tree.body)
    stated = {int(n) for n in re.findall(r"(\d+) (?:tests are )?CUDA[- ]only|the (\d+) CUDA tests|all (\d+) tests", DOC)
              for n in n if n}
    assert stated == {count}, (stated, count)
