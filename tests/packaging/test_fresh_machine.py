"""What a fresh clone on a fresh machine needs: the lab finds its own tools
with no venv activated, and the repository holds every file it points to."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
VENV_BIN = PROJECT / ".venv" / "bin"
MINIMAL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def minimal_env() -> dict[str, str]:
    """What a root shell on a fresh machine has: no venv, no /usr/local."""
    return {"PATH": MINIMAL_PATH, "HOME": "/root", "LANG": "C.UTF-8"}


def test_lab_finds_its_tools_with_a_minimal_path() -> None:
    out = subprocess.run([PROJECT / "lab" / "run", "--check-tools"], env=minimal_env(),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    found = dict(line.split()[1:] for line in out.stdout.splitlines()
                 if line.startswith("lab: ") and len(line.split()) == 3)
    for helper in ("vng", "virtme-run", "virtme-ng", "virtme-prep-kdir-mods"):
        assert found.get(helper) == str(VENV_BIN / helper), (helper, out.stdout)
    # vng really started its helper from that PATH (it printed qemu's command).
    assert "vng --dry-run: qemu-system-x86_64" in out.stdout, out.stdout
    # A boot's kernel command line (which carries the guest's command) fits
    # in the 2,048 bytes x86 keeps: a longer one hung the boot, silently.
    sizes = re.findall(r"^lab: kernel command line (\d+) bytes", out.stdout, re.M)
    assert len(sizes) == 1 and int(sizes[0]) < 2048, out.stdout


def test_without_the_venv_on_path_vng_misses_its_helpers() -> None:
    """Why lab/run puts .venv/bin on PATH: vng runs `virtme-run` by name.
    If this starts passing the other way (vng finds its helpers by itself),
    the PATH line in lab/run can go."""
    elsewhere = shutil.which("virtme-run", path=MINIMAL_PATH)
    if elsewhere is not None:
        pytest.skip(f"a virtme-ng outside .venv ({elsewhere}) hides the hazard here")
    kernel = sorted(Path("/boot").glob("vmlinuz-*-amd64"))[-1]
    out = subprocess.run([VENV_BIN / "vng", "--dry-run", "--run", str(kernel), "--disable-kvm",
                          "--", "true"], env=minimal_env(), capture_output=True, text=True,
                         timeout=180)
    assert out.returncode != 0 and "virtme-run: not found" in out.stderr, out


# A relative path to a Markdown file; not an absolute one (an installed
# file), not one built from a shell variable ($PROJECT/README.md).
MD_REFERENCE = re.compile(r"(?<![\w/.$}-])((?:\.\./)*[\w.-][\w./-]*\.md)\b")


def test_every_markdown_file_referred_to_is_in_the_repository() -> None:
    # -c safe.directory: scripts/test runs as root (through sudo) in a checkout
    # that may belong to the user who cloned it.
    tracked = subprocess.run(["git", "-c", "safe.directory=*", "ls-files", "-co",
                              "--exclude-standard"], cwd=PROJECT,
                             capture_output=True, text=True, check=True).stdout.split()
    missing = []
    for name in tracked:
        path = PROJECT / name
        if not path.is_file() or path.suffix in {".png", ".tar", ".img"}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for ref in set(MD_REFERENCE.findall(text)):
            if not ((PROJECT / ref).is_file() or (path.parent / ref).is_file()):
                missing.append(f"{name}: {ref}")
    assert not missing, missing
