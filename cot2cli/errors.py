"""Bad input is an expected outcome, not a crash: these errors become one line and exit code 2."""

from typing import Any

from tasks.base import TaskConfigError


class Cot2Error(Exception):
    """A setting, file or run name that cannot work; the message names it and what is allowed."""


BAD_INPUT = (Cot2Error, TaskConfigError)


def check_limits(group: str, values: Any, limits: dict[str, tuple[bool, str]]) -> None:
    """Raise Cot2Error on the first `key: (ok, allowed)` that is not ok, naming `group.key`, its value and
    what is allowed."""
    for key, (ok, allowed) in limits.items():
        if not ok:
            raise Cot2Error(f"{group}.{key}={values[key]} is out of range: must be {allowed}")


class Diverged(RuntimeError):
    """The loss or the weights stopped being finite: the run fails and keeps its last good checkpoint."""
