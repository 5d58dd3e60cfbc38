"""The one exception type for problems the user can fix (a config value, a missing file, a launch mistake).

Its message is one line that names the problem and the fix; ``hpc-gan`` prints it and exits 2. Anything else that
escapes is a bug and shows its traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input or environment; the message says what to change."""
