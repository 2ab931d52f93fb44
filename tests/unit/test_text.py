"""Text from outside made storable: valid UTF-8, no NUL or controls, cut on a boundary."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from app.text import shown, storable


def test_nul_controls_and_lone_surrogates_are_escaped_visibly() -> None:
    """What PostgreSQL's text refuses (NUL) and no encoder takes (a lone surrogate) is shown
    as an escape an operator can read; tabs and newlines stay."""
    assert storable("a\x00b\x1bc\ud800d\te\nf") == "a\\x00b\\x1bc\\ud800d\te\nf"


def test_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    assert storable(b"ok \xff\xfe end") == "ok \ufffd\ufffd end"


def test_text_is_cut_on_a_character_boundary() -> None:
    """A cut never splits a multi-byte character."""
    assert storable("\u20ac" * 3, limit_bytes=7) == "\u20ac\u20ac"
    assert storable("x" * 10, limit_bytes=4) == "xxxx"


@given(st.binary(max_size=6000) | st.text(max_size=3000))
def test_any_input_comes_out_storable(value: bytes | str) -> None:
    """Whatever comes in, what comes out encodes as UTF-8, has no NUL and fits the limit."""
    out = storable(value, limit_bytes=4096)
    assert out is not None
    encoded = out.encode("utf-8")
    assert b"\x00" not in encoded and len(encoded) <= 4096


def test_shown_cuts_long_values_with_an_ellipsis() -> None:
    assert shown("k" * 50) == "k" * 40 + "..."
