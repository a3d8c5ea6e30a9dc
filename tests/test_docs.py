"""The Python snippets of the docs run as written, top to bottom per file, in a fresh folder.

Blocks preceded by an ``<!-- not-run ... -->`` comment are fragments or need a network or a GPU.
Files whose snippets meta-train for a while (README.md, docs/meta-training.md: about 1 and 3
minutes on one CPU core) are left to a manual run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAST_FILES = [
    "docs/index.md",
    "docs/getting-started.md",
    "docs/optimizer.md",
    "docs/rules.md",
    "docs/pretrained-format.md",
    "docs/tasks.md",
    "docs/compare.md",
]


def runnable_blocks(markdown: str) -> list[str]:
    """The ```python blocks of ``markdown`` that no ``<!-- not-run`` comment precedes."""
    blocks, previous = [], ""
    for match in re.finditer(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M):
        before = markdown[: match.start()].rstrip().splitlines()
        previous = before[-1] if before else ""
        if not previous.startswith("<!-- not-run"):
            blocks.append(match.group(1))
    return blocks


def test_runnable_blocks_skips_marked_fragments():
    text = "a\n\n```python\nx = 1\n```\n\n<!-- not-run -->\n```python\nmodel.fit()\n```\n"
    assert runnable_blocks(text) == ["x = 1\n"]


@pytest.mark.parametrize("name", FAST_FILES)
def test_doc_snippets_run(name, tmp_path):
    blocks = runnable_blocks((ROOT / name).read_text())
    script = "import torch\ntorch.set_num_threads(1)\n" + "\n".join(blocks)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{name}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
