"""Man pages and shell completion, generated from the argument parsers, so
that what `man dmd` says cannot drift from what `dmd` accepts.

    python -m dmd.manpage dmd            dmd(8) in roff, on stdout
    python -m dmd.manpage dmctl          dmctl(8)
    python -m dmd.manpage dmd-snapshotter   dmd-snapshotter(8)
    python -m dmd.manpage --bash dmctl   bash completion for dmctl

scripts/install writes them all. argparse has no public API for walking a
parser; its ``_actions`` list is what argparse's own help formatter reads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from dmd import __version__
from dmd.dbus.names import BUS_NAME


@dataclass(frozen=True)
class Page:
    parser: argparse.ArgumentParser
    summary: str
    sections: tuple[tuple[str, str], ...]  # (title, roff text), after the options


def roff_escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    # A line starting with . or ' would be read as a request.
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in text.split("\n"))


def visible_actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            yield action


def subcommands(parser: argparse.ArgumentParser
                ) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(verb, its one-line help, its parser) in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def option_label(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest)
    takes_value = action.nargs != 0
    metavar = str(action.metavar or action.dest.upper()) if takes_value else ""
    if action.choices is not None and takes_value:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    return ", ".join(f"{flag} {metavar}".strip() for flag in action.option_strings)


def option_help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {"default": action.default, "prog": "", "choices": action.choices}
    return text


def options_roff(parser: argparse.ArgumentParser, skip: set[str]) -> list[str]:
    out = []
    for action in visible_actions(parser):
        if isinstance(action, argparse._SubParsersAction):
            continue
        if set(action.option_strings) & skip:
            continue
        out += [".TP", "\\fB" + roff_escape(option_label(action)) + "\\fR",
                roff_escape(option_help(action))]
    return out


def usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split()).removeprefix("usage: ")


def render(page: Page) -> str:
    parser = page.parser
    name = parser.prog
    lines = [
        f'.TH {name.upper()} 8 "" "dmd {__version__}" "System Administration"',
        ".SH NAME", f"{name} \\- {roff_escape(page.summary)}",
        ".SH SYNOPSIS", ".B " + roff_escape(usage(parser)),
        ".SH DESCRIPTION", roff_escape(parser.description or ""),
        ".SH OPTIONS",
    ]
    lines += options_roff(parser, skip=set())
    common = {flag for a in visible_actions(parser) for flag in a.option_strings}
    verbs = subcommands(parser)
    # Each verb's synopsis without the options every verb shares.
    shared = usage(parser).removeprefix(name).split(" VERB")[0].strip()
    if verbs:
        lines += [".SH COMMANDS",
                  roff_escape("Every command also takes the options above, before or "
                              "after its name.")]
        for _, help_text, sub in verbs:
            lines += [".SS " + roff_escape(" ".join(usage(sub).replace(shared, "").split())),
                      roff_escape(help_text[:1].upper() + help_text[1:] + ".")]
            lines += options_roff(sub, skip=common)
    for title, text in page.sections:
        lines += [".SH " + title, text]
    if parser.epilog:
        lines += [".SH NOTES", roff_escape(parser.epilog)]
    return "\n".join(lines) + "\n"


def dmd_page() -> Page:
    from dmd.daemon import DEFAULT_STATE_DIR, build_parser
    return Page(build_parser(), "the device-mapper daemon", (
        ("FILES", "\n".join([
            ".TP", f"\\fB{DEFAULT_STATE_DIR}/\\fR",
            "dmd's database (what it made, for whom, the tables to re-create, the "
            "journal of unfinished operations) and its lock.",
            ".TP", "\\fB/dev/mapper/control\\fR",
            "the kernel's device\\-mapper control device, which dmd speaks to.",
        ])),
        ("SEE ALSO", "\\fBdmctl\\fR(8), \\fBdmsetup\\fR(8), \\fBbusctl\\fR(1)"),
    ))


def dmctl_page() -> Page:
    from dmd.cli.main import parser
    return Page(parser(), f"talk to dmd ({BUS_NAME}) over D-Bus", (
        ("EXIT STATUS", "0 on success, 1 when a call failed (one line on stderr names "
         "the error), 2 for a usage error, 130 when interrupted."),
        ("SEE ALSO", "\\fBdmd\\fR(8), \\fBdmsetup\\fR(8)"),
    ))


def snapshotter_page() -> Page:
    from dmd.snapshotter.main import DEFAULT_SOCKET, parser
    return Page(parser(), "containerd's snapshotter on dmd's volumes", (
        ("CONTAINERD", roff_escape(
            "In containerd's configuration (/etc/containerd/config.toml), then "
            "ctr run --snapshotter dmd, or the CRI plugin's snapshotter = \"dmd\":") +
         "\n.nf\n" + roff_escape(
            f'[proxy_plugins]\n  [proxy_plugins.dmd]\n    type = "snapshot"\n'
            f'    address = "{DEFAULT_SOCKET}"') + "\n.fi"),
        ("FILES", "\n".join([
            ".TP", f"\\fB{DEFAULT_SOCKET}\\fR",
            "the socket it serves gRPC on (mode 0600: a client acts with its rights)."])),
        ("SEE ALSO", "\\fBdmd\\fR(8), \\fBdmctl\\fR(8), \\fBctr\\fR(8), "
         "\\fBcontainerd\\fR(8)"),
    ))


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A completion function for bash: verbs, each verb's options, and device
    names (asked of dmd with `ls`) where a verb takes a NAME."""
    prog = parser.prog
    common = sorted(flag for a in visible_actions(parser) for flag in a.option_strings)
    cases = []
    for verb, _, sub in subcommands(parser):
        flags = sorted(flag for a in visible_actions(sub) for flag in a.option_strings)
        takes_name = any(a.dest == "name" for a in sub._actions)
        cases.append(f"        {verb}) opts=\"{' '.join(flags)}\"; names={int(takes_name)} ;;")
    verbs = " ".join(v for v, _, _ in subcommands(parser))
    fn = "_" + prog.replace("-", "_")
    return f"""# bash completion for {prog}; generated by python -m dmd.manpage --bash {prog}
{fn}() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} verb="" word session="" i opts names=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${{COMP_WORDS[i]}}
        [[ $word == --session ]] && session=--session
        [[ -z $verb && $word != -* ]] && verb=$word
    done
    if [[ -z $verb ]]; then
        COMPREPLY=($(compgen -W "{verbs} {' '.join(common)}" -- "$cur"))
        return
    fi
    case $verb in
{chr(10).join(cases)}
        *) opts=""; names=0 ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [[ $names == 1 ]]; then
        COMPREPLY=($(compgen -W "$({prog} $session --timeout 5 ls 2>/dev/null \\
            | awk -F '\\t' 'NF > 1 {{ print $1 }}')" -- "$cur"))
    fi
}}
complete -F {fn} {prog}
"""


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(
        prog="python -m dmd.manpage",
        description="print the man page (roff) of dmd, dmctl or dmd-snapshotter, or "
                    "dmctl's bash completion")
    args.add_argument("--bash", action="store_true", help="print bash completion instead")
    args.add_argument("program", choices=("dmd", "dmctl", "dmd-snapshotter"))
    ns = args.parse_args(argv)
    page = {"dmd": dmd_page, "dmctl": dmctl_page,
            "dmd-snapshotter": snapshotter_page}[ns.program]()
    sys.stdout.write(bash_completion(page.parser) if ns.bash else render(page))
    return 0


if __name__ == "__main__":
    sys.exit(main())
