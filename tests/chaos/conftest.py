"""The fault suite's summary: every scenario's row of figures, printed at the end of the run."""

from __future__ import annotations

from typing import Any

from tests.chaos.harness import RESULTS, SCALE, Figures


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    terminalreporter.section(f"chaos figures (CHAOS_SCALE={SCALE})")
    terminalreporter.write_line(Figures.HEADER)
    for figures in RESULTS:
        terminalreporter.write_line(figures.row())
