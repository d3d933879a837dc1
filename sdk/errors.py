"""One root exception, a few meaningful subclasses, and the process exit codes (httpie `status.py` style).

Every error a user can see is raised as one of these with a one-line message that says what was
expected, what was found and what to do. The CLI prints that line and exits with the class's code.
"""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of every edgeopt command. Scripts may rely on them."""

    OK = 0
    ERROR = 1  # unexpected failure (bug): reported with --traceback hint
    USAGE = 2  # bad flags or arguments (click's own code)
    INPUT = 3  # bad input file: model, calibration data, profile, package
    UNSUPPORTED = 4  # the target runtime/device cannot run this model or profile
    MISSING_DEPENDENCY = 5  # an optional runtime is not installed
    ACCURACY = 6  # accuracy budget missed: nothing written
    SECURITY = 7  # signature or hash check failed
    UNAVAILABLE = 8  # a service (broker, database, server) could not be reached


class EdgeoptError(Exception):
    """Root of all errors edgeopt reports to users."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and the fix on a single line, as the CLI prints it."""
        text = " ".join(self.message.split())
        if self.hint:
            text += f" ({' '.join(self.hint.split())})"
        return text


class InputError(EdgeoptError):
    """A file or value the user gave is malformed or does not fit (model, calib data, shapes)."""

    exit_code = ExitCode.INPUT


class ConfigError(InputError):
    """A profile or config file failed validation."""


class PackageError(InputError):
    """A package file is malformed, truncated or unsafe to extract."""


class UnsupportedError(EdgeoptError):
    """The model or profile cannot run on the requested runtime or device."""

    exit_code = ExitCode.UNSUPPORTED


class MissingDependencyError(EdgeoptError):
    """An optional dependency (runtime) is not installed; the message names the extra."""

    exit_code = ExitCode.MISSING_DEPENDENCY


class AccuracyError(EdgeoptError):
    """The optimized model missed the profile's accuracy budget."""

    exit_code = ExitCode.ACCURACY


class SecurityError(EdgeoptError):
    """A signature or hash check failed."""

    exit_code = ExitCode.SECURITY


class UnavailableError(EdgeoptError):
    """A service the command needs could not be reached."""

    exit_code = ExitCode.UNAVAILABLE


def missing_extra(module: str, extra: str) -> MissingDependencyError:
    """The error for an optional module that is not importable."""
    return MissingDependencyError(
        f"{module} is not installed", hint=f"install it with: pip install 'edgeopt[{extra}]'"
    )
