"""The repository's shell scripts (experiments/*.sh, .ci/run) parse: `bash -n` reads a
whole script without running it, so a quote that never closes fails here rather than hours
into a study."""
import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.sh"))
                 + [os.path.join(ROOT, ".ci", "run")])


def test_there_are_scripts_to_check():
    assert any(path.endswith("study.sh") for path in SCRIPTS)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_the_script_parses(path):
    checked = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_the_check_catches_an_unclosed_quote(tmp_path):
    broken = tmp_path / "broken.sh"
    broken.write_text(': "${X:?the authors\' files}"\necho done\n')
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True).returncode != 0
