"""dmsetup's table text: one target per line, ``start length type params``."""

from __future__ import annotations

Line = tuple[int, int, str, str]


class TableSyntaxError(ValueError):
    pass


def parse_table(text: str) -> list[Line]:
    """Lines of ``start length type [params...]``; blank lines and ``#``
    comments are skipped, as dmsetup does."""
    lines: list[Line] = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split(None, 3)
        if len(fields) < 3:
            raise TableSyntaxError(f"table line {number}: expected 'start length type params'")
        try:
            start, length = int(fields[0]), int(fields[1])
        except ValueError:
            raise TableSyntaxError(
                f"table line {number}: start and length must be numbers of sectors") from None
        if start < 0 or length < 0:
            raise TableSyntaxError(f"table line {number}: negative sector numbers")
        lines.append((start, length, fields[2], fields[3] if len(fields) > 3 else ""))
    if not lines:
        raise TableSyntaxError("the table is empty")
    return lines


def format_table(lines: list[list[object]] | list[Line]) -> str:
    return "\n".join(" ".join(str(f) for f in line if f != "") for line in lines)
