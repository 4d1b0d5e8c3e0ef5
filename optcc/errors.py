"""One exception hierarchy for everything a user can get wrong.

Every subclass of :class:`OptccError` describes a mistake in the user's input or
environment (a wrong recipe, a corrupt model, a failing plugin, a missing extra). The CLI
prints such an error as one line (plus an optional hint) and exits non-zero, without a
traceback. Any other exception escaping optcc is a bug in optcc and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (the type name when it has none): libraries
    such as ONNX and ONNX Runtime put long dumps after the line a user needs."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class OptccError(Exception):
    """Base class of every user-facing optcc error.

    ``hint`` is an optional second line: what to do about it (a did-you-mean, a command to
    run, an extra to install).
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class RecipeError(OptccError):
    """A recipe that cannot be used: YAML syntax, schema, unknown pass or option.

    The message starts with ``file:line:col`` when the location is known, the way compilers
    report errors, so editors can jump to it.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        col: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        self.line = line
        self.col = col
        where = ""
        if self.file is not None:
            where = self.file
            if line is not None:
                where += f":{line}"
                if col is not None:
                    where += f":{col}"
            where += ": "
        super().__init__(where + message, hint=hint)
        self.bare_message = message


class PluginError(OptccError):
    """A plugin that failed to import, declares an unknown hook, or misbehaves."""

    def __init__(self, message: str, *, plugin: str, hint: str | None = None) -> None:
        super().__init__(f"plugin '{plugin}': {message}", hint=hint)
        self.plugin = plugin


class ModelError(OptccError):
    """A model that cannot be loaded, exported, verified or run."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.path = str(path) if path is not None else None
        prefix = f"{self.path}: " if self.path else ""
        super().__init__(prefix + message, hint=hint)


class DataError(OptccError):
    """A data source that is missing, malformed, or does not fit the model's inputs."""


class PassError(OptccError):
    """A pass that failed while running. Names the pass, its position and its plugin."""

    def __init__(
        self,
        message: str,
        *,
        pass_name: str,
        position: int,
        plugin: str | None = None,
        ran_before: list[str] | None = None,
        hint: str | None = None,
        internal: bool = False,
    ) -> None:
        self.pass_name = pass_name
        self.position = position
        self.plugin = plugin
        self.ran_before = list(ran_before or [])
        #: an unexpected exception inside one of optcc's own passes: a bug in optcc, not in
        #: the recipe, the model or a third-party plugin (the CLI exits 70 and keeps the
        #: traceback)
        self.internal = internal
        owner = f" (plugin '{plugin}')" if plugin else ""
        super().__init__(
            f"pass #{position} '{pass_name}'{owner}: {message}",
            hint=hint,
        )
        self.reproducer: Path | None = None


class PreconditionError(PassError):
    """A pass's requirements (capabilities, inputs) were not met before it ran."""


class VerificationError(PassError):
    """The model a pass produced is invalid (checker, shape inference) or not runnable."""


class ToleranceError(VerificationError):
    """A pass changed the model's outputs by more than its declared tolerance."""


class BackendError(OptccError):
    """A backend failed to compile or run a model."""


class BackendUnavailable(BackendError):
    """A backend whose libraries or hardware are missing on this machine."""

    def __init__(self, backend: str, reason: str, *, install_hint: str | None = None) -> None:
        super().__init__(f"backend '{backend}' is not available: {reason}", hint=install_hint)
        self.backend = backend
        self.reason = reason


class RecipeErrors(RecipeError):
    """Several recipe errors found in one go (``optcc validate`` reports them all, in file
    order). It reads as the first error; ``errors`` holds every one."""

    def __init__(self, errors: list[RecipeError]) -> None:
        first = errors[0]
        super().__init__(
            first.bare_message, file=first.file, line=first.line, col=first.col, hint=first.hint
        )
        self.errors = list(errors)


class OutputError(OptccError):
    """An output folder optcc may not write or replace: it holds files optcc did not make,
    is a file or a link, contains an input of the build, or another build is writing it."""


class ResourceError(OptccError):
    """The machine cannot do what was asked: a file system refused (permissions, read-only,
    full, name too long) or an allocation would exceed the memory optcc allows itself."""


class BuildInterrupted(OptccError):
    """The user interrupted a build (Ctrl-C or SIGTERM); the message says what state the
    output folder was left in."""
