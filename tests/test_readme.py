"""The README's code runs as written, and reads what a person reads in its example photos (labelled by
eye: ``examples/10963.png`` shows 23, ``examples/whole_photo.jpg`` a plaque with 35)."""
import re
import subprocess
import sys

import pytest

from .conftest import ROOT

README = ROOT / "README.md"


def python_block(section: str) -> str:
    """The first ```python block under the README heading ``section``."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def run_python(code: str) -> str:
    """``code`` run as a person runs it: ``python`` in the repository's root."""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
                            "DIGIT_DEMO_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_the_readme_is_short_and_its_commands_name_real_subcommands():
    assert len(README.read_bytes()) <= 12_000
    from digit_demo.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    used = set(re.findall(r"python -m digit_demo (\w+)", README.read_text()))
    assert used and used <= commands, used - commands


@pytest.mark.slow
def test_the_library_example_reads_the_example_photos():
    out = run_python(python_block("Library")).splitlines()
    assert [line.split()[:2] for line in out] == [["10963.png", "23"], ["whole_photo.jpg", "35"]]
