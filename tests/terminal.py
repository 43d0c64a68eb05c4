"""What a terminal shows for the raw output of a command (the console's tests): enough of a VT100 for
rich's live display."""
from __future__ import annotations

import re

TOKEN = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+")


def screen(raw: str) -> list[str]:
    """The lines on the screen after `raw`: \\r returns to column 0, \\n starts the next line, ESC[nA moves
    n lines up, ESC[K / ESC[2K erase to the end of / the whole line; other escape sequences (cursor
    visibility, colours) draw nothing. Trailing empty lines are left out."""
    lines, row, col = [""], 0, 0
    for tok in TOKEN.findall(raw):
        if tok == "\r":
            col = 0
        elif tok == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif tok.startswith("\x1b["):
            arg, code = tok[2:-1], tok[-1]
            if code == "K":
                lines[row] = "" if arg == "2" else lines[row][:col]
            elif code == "A":
                row = max(0, row - int(arg or 1))
        else:
            cur = lines[row].ljust(col)
            lines[row] = cur[:col] + tok + cur[col + len(tok):]
            col += len(tok)
    while lines and not lines[-1]:
        lines.pop()
    return lines
