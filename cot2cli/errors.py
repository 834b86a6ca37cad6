"""Bad input is an expected outcome, not a crash: these errors become one line and exit code 2."""

from tasks.base import TaskConfigError


class Cot2Error(Exception):
    """A setting, file or run name that cannot work; the message names it and what is allowed."""


BAD_INPUT = (Cot2Error, TaskConfigError)


class Diverged(RuntimeError):
    """The loss or the weights stopped being finite: the run fails and keeps its last good checkpoint."""
