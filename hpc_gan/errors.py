"""The one exception type for problems the user can fix (a config value, a missing file, a launch mistake).

Its message is one line that names the problem and the fix; ``hpc-gan`` prints it and exits 2 (3: the watchdog
stopped the run). Anything else that escapes is a bug and shows its traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input or environment; the message says what to change."""
    exit_code = 2


class AlarmStop(UserError):
    """The collapse watchdog stopped the run (train.on_alarm=stop, or rollbacks used up): exit 3, so a job script
    can tell it from bad input; the message names the alarm and the checkpoint to go back to."""
    exit_code = 3
