"""Where a result came from (l2t_jax.training.provenance): the commit of the checkout the
package runs from, and nothing for a copy of the package outside a checkout."""
import os
import shutil
import subprocess
import sys

from helpers import REPO_ROOT
from l2t_jax.training import provenance


def test_a_checkout_records_its_commit():
    head = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    recorded = provenance.git_commit()
    assert recorded is not None and recorded["commit"] == head


def test_a_copy_of_the_package_inside_another_checkout_records_none(tmp_path):
    """A package installed under some repository (a venv inside it) is not that
    repository's code."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    site = tmp_path / "venv" / "site-packages"
    shutil.copytree(os.path.join(REPO_ROOT, "l2t_jax"), site / "l2t_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import l2t_jax.training.provenance as p; "
             "print(p.__file__); print(p.git_commit())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, check=True, env=dict(os.environ, PYTHONPATH=str(site)))
    where, commit = out.stdout.strip().splitlines()
    assert where.startswith(str(site)) and commit == "None"
