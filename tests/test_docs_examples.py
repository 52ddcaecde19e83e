"""The shell examples in README.md and docs/*.md marked `<!-- runnable -->` run, in order, and succeed.

Each page's marked blocks run one after another in one bash process per block, in a scratch folder that sees the
repository's para_trainer/, networks/, presets/ and train_para.py, so an example may use what an earlier one on the
same page wrote. `para-trainer` is this checkout's CLI and `python` the tests' interpreter. A block that fails shows its command and output.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "<!-- runnable -->"
LINKED = ("para_trainer", "networks", "presets", "train_para.py")


def runnable_blocks(path: str) -> list[str]:
    """The ```bash blocks that directly follow a runnable mark (a line of its own)."""
    text = open(path, encoding="utf-8").read()
    blocks = re.findall(r"(?m)^" + re.escape(MARK) + r"[ \t]*\n```(?:bash|sh)\n(.*?)\n```", text, flags=re.DOTALL)
    if marks(text) != len(blocks):
        raise AssertionError(f"{path}: a runnable mark is not followed by a ```bash block")
    return blocks


def marks(text: str) -> int:
    """Lines that are the mark alone (the mark quoted inside a sentence does not count)."""
    return sum(line.strip() == MARK for line in text.splitlines())


def pages() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    candidates = [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md"))
    return [path for path in candidates if marks(open(path, encoding="utf-8").read())]


def test_the_readme_has_runnable_examples():
    assert len(runnable_blocks(os.path.join(ROOT, "README.md"))) >= 4


@pytest.mark.parametrize("page", pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_marked_examples_run(page, tmp_path):
    for name in LINKED:
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = dict(os.environ, PYTHONPATH=ROOT, PARA_PYTHON=sys.executable)
    prelude = ('set -euo pipefail\npara-trainer() { "$PARA_PYTHON" -m para_trainer "$@"; }\n'
               'python() { "$PARA_PYTHON" "$@"; }\n')
    for block in runnable_blocks(page):
        done = subprocess.run(["bash", "-c", prelude + block], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{os.path.relpath(page, ROOT)}:\n{block}\n--- output:\n" \
                                     f"{(done.stdout + done.stderr)[-3000:]}"
