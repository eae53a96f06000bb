"""Errors a user can cause and fix; the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (prompt, path, config value, checkpoint...). The message is shown as-is, no traceback."""

    exit_code = 2


class TeacherError(UserError):
    """A teacher model that is missing, unreachable or malformed."""


class ConfigError(UserError):
    """An unknown config key or a value of the wrong type or range."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not match the run."""


class NumericalError(UserError):
    """A loss or gradient that became NaN/inf and could not be recovered."""

    exit_code = 3
