"""JSON Lines: one JSON value a line, every error naming its file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def json_lines(
    lines: Iterable[str], source: str, error: type[ValueError] = ValueError
) -> Iterator[tuple[str, Any]]:
    """(where, value) of every non-blank line, where = "SOURCE line N" (1-based). A UTF-8 byte order
    mark before the first line is skipped; a line that is not JSON raises `error` naming it, with a hint
    when the file is one JSON array rather than JSON lines."""
    for number, line in enumerate(lines, start=1):
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            hint = "; JSON lines hold one object per line, not an array" if line.lstrip()[:1] == "[" else ""
            raise error(f"{where}: not valid JSON ({err.msg}){hint}") from None
        yield where, value
