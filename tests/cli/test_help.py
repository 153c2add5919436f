"""What a newcomer meets first: --help for every option, man pages made from
the same parsers, options after the verb, and bash completion."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dmd.manpage import bash_completion, dmctl_page, dmd_page, render, subcommands

PAGES = {"dmd": dmd_page, "dmctl": dmctl_page}


def parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    return [(parser.prog, parser)] + [(sub.prog, sub) for _, _, sub in subcommands(parser)]


def unescape(roff: str) -> str:
    return roff.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")


@pytest.mark.parametrize("program", sorted(PAGES))
def test_every_option_is_explained(program: str) -> None:
    page = PAGES[program]()
    for prog, parser in parsers(page.parser):
        for action in parser._actions:
            if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                assert all(a.help for a in action._choices_actions), prog
                continue
            assert action.help, f"{prog} {action.option_strings or action.dest}: no help"


@pytest.mark.parametrize("program", sorted(PAGES))
def test_man_page_names_every_option_and_verb(program: str) -> None:
    page = PAGES[program]()
    text = unescape(render(page))
    assert text.startswith(f".TH {program.upper()} 8 ")
    for prog, parser in parsers(page.parser):
        for action in parser._actions:
            if action.help is argparse.SUPPRESS:
                continue
            for flag in action.option_strings:
                assert flag in text, f"{prog}: {flag} missing from {program}(8)"
    for verb, _, _ in subcommands(page.parser):
        assert f"\n.SS {page.parser.prog} {verb}" in text, verb
    # A roff request at the start of a line that is not one of ours would
    # swallow text: every line starting with "." is a request we wrote.
    for line in render(page).splitlines():
        if line.startswith("."):
            assert line.split()[0] in {".TH", ".SH", ".SS", ".TP", ".B"}, line


def test_hidden_options_stay_out_of_the_man_page() -> None:
    assert "--udev-buffer" not in unescape(render(dmd_page()))


def test_help_runs(tmp_path: Path) -> None:
    for module in ("dmd", "dmd.cli.main"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 0 and "--" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-m", "dmd.cli.main", "remove", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert "--deferred" in out.stdout and "--json" in out.stdout


def run_dmctl(dmd: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmd.cli.main", *args], env=dmd.env,
                          capture_output=True, text=True, timeout=60)


def test_options_after_the_verb(dmd_session: Any) -> None:
    made = run_dmctl(dmd_session, "create", "late", "--table", "0 8 zero", "--session")
    assert made.returncode == 0, made.stderr
    before = run_dmctl(dmd_session, "--session", "--json", "ls")
    after = run_dmctl(dmd_session, "ls", "--json", "--session")
    mixed = run_dmctl(dmd_session, "--session", "ls", "--json", "--timeout", "30")
    assert before.returncode == after.returncode == mixed.returncode == 0, after.stderr
    assert before.stdout == after.stdout == mixed.stdout
    assert '"name": "late"' in after.stdout
    info = run_dmctl(dmd_session, "--session", "info", "late", "--json")
    assert info.returncode == 0 and '"Name": "late"' in info.stdout
    # Given before the verb and not repeated after it: still in force.
    text = run_dmctl(dmd_session, "--session", "ls")
    assert text.stdout.startswith("late\t(")


def complete(script: Path, words: list[str], env: dict[str, str]) -> list[str]:
    line = " ".join(f"'{w}'" for w in words)
    out = subprocess.run(
        ["bash", "-c", f'source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; '
         '_dmctl; printf "%s\\n" "${COMPREPLY[@]}"'],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    return [w for w in out.stdout.splitlines() if w]


def test_bash_completion(dmd_session: Any, tmp_path: Path) -> None:
    from dmd.cli.main import parser
    script = tmp_path / "dmctl.bash"
    script.write_text(bash_completion(parser()))
    subprocess.run(["bash", "-n", str(script)], check=True)
    # dmctl as installed: the venv's entry point, found by name.
    env = dict(dmd_session.env,
               PATH=f"{os.path.dirname(sys.executable)}:{dmd_session.env['PATH']}")
    assert complete(script, ["dmctl", "re"], env) == [
        "reload", "resume", "rename", "remove", "remove-all-managed", "remove-key", "resize",
        "revert"]
    assert complete(script, ["dmctl", "remove", "--d"], env) == ["--deferred"]
    assert run_dmctl(dmd_session, "--session", "create", "comp-one", "--table",
                     "0 8 zero").returncode == 0
    assert complete(script, ["dmctl", "--session", "info", "comp"], env) == ["comp-one"]
    assert complete(script, ["dmctl", "--session", "ls", "comp"], env) == []  # ls takes none
