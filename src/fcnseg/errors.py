"""User-facing errors.

Every error a user can cause (bad data, bad config, bad file, no network) is raised as a subclass of
``FcnsegError`` with a one-line message that says what is wrong, where, and what to do. Entry points catch
``FcnsegError`` and print ``error: <message>`` instead of a traceback (see ``fcnseg.cli.run_cli``).
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
