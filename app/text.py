"""Text from outside made storable: every backend keeps it, every log and API answer shows it.

Mozrest's answers, exception messages and the keys of an RMS's payload can hold anything: NUL
(PostgreSQL's `text` refuses it), invalid UTF-8, lone surrogates (no encoder takes them),
megabytes. The relay stores such text only through `storable`, so one odd answer or row can never
make a write fail.
"""

from __future__ import annotations

import re

#: C0 controls but tab, newline and carriage return, DEL, and lone surrogates: shown escaped.
_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def storable(value: str | bytes | None, *, limit_bytes: int | None = None) -> str | None:
    """`value` as valid UTF-8 text without NUL or other control characters (shown as `\\xNN`
    escapes), cut to at most `limit_bytes` bytes of UTF-8 on a character boundary."""
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = _UNSAFE.sub(_escape, text)
    if limit_bytes is not None and len(text) * 4 > limit_bytes:
        encoded = text.encode("utf-8")
        if len(encoded) > limit_bytes:
            text = encoded[:limit_bytes].decode("utf-8", "ignore")
    return text


def shown(value: str, *, limit_chars: int = 40) -> str:
    """A short, safe rendering of a value from outside for an error message (an unknown key, an
    unknown status): escaped as `storable` does, and cut with an ellipsis."""
    text = storable(value) or ""
    return text if len(text) <= limit_chars else f"{text[:limit_chars]}..."
