"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input: a flag, a config key, an environment value, a missing file, an absent backend.

    The message names the input and what is accepted; the CLI prints it on one line and exits 2.
    """
