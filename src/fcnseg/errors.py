"""User-facing errors.

Every error a user can cause (bad data, bad config, bad file, no network) is raised as a subclass of
``FcnsegError`` with a one-line message that says what is wrong, where, and what to do. Entry points catch
``FcnsegError`` and print ``error: <message>`` instead of a traceback
(:func:`fcnseg.cli_errors.exit_on_user_error`).
"""


class FcnsegError(Exception):
    """An error caused by the user's input or environment, with a one-line actionable message."""


class DataError(FcnsegError):
    """A dataset is missing, empty or malformed."""


class ConfigError(FcnsegError):
    """A configuration value or override is invalid."""


class FetchError(FcnsegError):
    """A download or extraction failed."""


class CheckpointError(FcnsegError):
    """A checkpoint or weights file is missing, corrupt or of the wrong kind."""


class TrackingError(FcnsegError):
    """The MLflow tracking server or model registry cannot be used."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message for the user's one line: its first non-empty line with whitespace collapsed (what
    follows is detail: a traceback, a dump), the exception's type when it says nothing, cut at ``limit``."""
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    text = " ".join(first.split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
