"""The installed package holds every module and data file of the source tree (a plain
``pip install .``, as the Docker image runs it, not only the editable install of the tests)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ("bot", "chat", "engine", "faq", "migrations", "tools")
DATA = ("*.py", "*.sql", "*.toml", "*.md", "*.c")


def test_the_wheel_carries_every_module_and_data_file(tmp_path: Path) -> None:
    """Every source and data file under the packages is in the wheel (a subpackage left out of
    the package list once made the image fail at start)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' scratch folder
    (wheel,) = tmp_path.glob("*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", *RUNTIME], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    wanted = {name for name in tracked if any(Path(name).match(pattern) for pattern in DATA)}
    assert wanted and not wanted - inside, sorted(wanted - inside)
