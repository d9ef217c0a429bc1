"""What may not appear in text the pack shows on the canvas (result boxes, progress lines, errors): Python reprs,
long hashes, source paths. Shared by the unit tests and the browser suite."""

from __future__ import annotations

import re

#: Python's repr of a dict / list / tuple of strings, a class or object repr, a traceback line, an exception class.
PYTHON_REPR = re.compile(r"\{'[^']*': |\['[^']*', '|\(\'[^']*', |<class '|<[\w.]+ object at 0x|Traceback \(|"
                         r"\bFile \"[^\"]+\", line \d+|\b(?:KeyError|TypeError|AttributeError|IndexError)\b|"
                         r"\bNone\b|\blen\(")
#: A run of more than 12 hex digits (a sha256, a full record key).
LONG_HASH = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{13,}(?![0-9a-fA-F])")
#: A Python source file.
SOURCE_PATH = re.compile(r"[\w./\\-]+\.py\b")


def plain_words_problems(text: str) -> list[str]:
    """The pieces of ``text`` that someone who never saw the code should not have to read."""
    found = []
    for what, pattern in (("Python repr", PYTHON_REPR), ("hash longer than 12 characters", LONG_HASH),
                          ("source path", SOURCE_PATH)):
        found += [f"{what}: {m.group(0)!r}" for m in pattern.finditer(text)]
    return found
