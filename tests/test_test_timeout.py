"""The suite's own guard against a hung test: a test past the configured
timeout fails, with the stacks of its threads, and the run goes on to the
next test (in the kernel lab a hang would otherwise cost a whole boot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_hung_test_fails_alone_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "test_hang.py").write_text(
        "import time\n\n"
        "def test_hangs():\n    time.sleep(60)\n\n"
        "def test_after():\n    pass\n")
    # The project's configuration, with the limit cut to a second.
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
         str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), "-o", "timeout=1",
         str(tmp_path / "test_hang.py")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Timeout (>1.0s) from pytest-timeout" in out.stdout, out.stdout
    assert "1 failed, 1 passed" in out.stdout, out.stdout


def test_the_project_sets_a_timeout() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert "\ntimeout = 240\n" in text
    assert '"pytest-timeout' in text
