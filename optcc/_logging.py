"""Keep third-party chatter (prints, warnings, their own log handlers) out of the terminal.

torch.onnx prints progress lines to stdout, emits deprecation warnings, and torch installs
its own ``StreamHandler`` objects that write straight to the terminal. Printed over a
progress display (or into ``optcc build --json`` output) that is noise at best and broken
output at worst. :func:`captured_output` routes all of it into optcc's log instead, one
record per line, so it stays available with ``-v`` and in the build log.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def captured_output(logger: logging.Logger, label: str, level: int = logging.INFO) -> Iterator[None]:
    """Capture stdout, stderr, warnings and other libraries' terminal log handlers while the
    block runs; log what was captured to ``logger`` at ``level``, prefixed with ``label``."""
    buffer = io.StringIO()
    terminals = {id(sys.stdout), id(sys.stderr), id(sys.__stdout__), id(sys.__stderr__)}
    swapped: list[tuple[logging.StreamHandler, object]] = []  # type: ignore[type-arg]
    loggers = [logging.getLogger()] + [
        lg for lg in list(logging.root.manager.loggerDict.values()) if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            if (type(handler) is logging.StreamHandler
                    and id(getattr(handler, "stream", None)) in terminals
                    and not lg.name.startswith("optcc") and lg is not logging.getLogger()):
                swapped.append((handler, handler.stream))
                handler.setStream(buffer)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(
            buffer
        ), contextlib.redirect_stderr(buffer):
            warnings.simplefilter("always")
            yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)  # type: ignore[arg-type]
        for warning in caught:
            logger.log(level, "%s: %s: %s", label, warning.category.__name__, warning.message)
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logger.log(level, "%s: %s", label, line.rstrip())


class _BuildLogHandler(logging.Handler):
    """Root handler (installed once) that copies records into the running build's log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                            "%H:%M:%S"))
        self.lines: list[str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.lines is not None and len(self.lines) < MAX_BUILD_LOG_LINES:
            try:
                self.lines.append(self.format(record))
            except Exception:
                self.handleError(record)


MAX_BUILD_LOG_LINES = 100_000
_BUILD_LOG = _BuildLogHandler()


def start_build_log() -> list[str]:
    """Start collecting INFO and higher records (optcc's own, and the library output that
    :func:`captured_output` routed into the log) for a build's ``build.log``; returns the
    list the lines go into. A new build starts a new list. Records below the loggers'
    configured levels never reach it: the CLI sets INFO; a library user's configuration
    decides."""
    root = logging.getLogger()
    if _BUILD_LOG not in root.handlers:
        root.addHandler(_BUILD_LOG)
    _BUILD_LOG.lines = []
    return _BUILD_LOG.lines
