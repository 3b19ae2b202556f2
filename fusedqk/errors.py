"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input: a flag, a config key, an environment value, a missing file, an absent backend.

    The message names the input and what is accepted; the CLI prints it on one line and exits 2.
    """


def key_path(parts) -> str:
    """A dotted path of keys for an error line; a key that would not print as itself on one
    line (a newline in it, say) is shown quoted and escaped."""
    return ".".join(str(p) if str(p).isprintable() else repr(p) for p in parts)


def shown(value: str, limit: int = 60) -> str:
    """A user's value as an error line quotes it: repr'd, and cut where it is long."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


def first_line(e: BaseException) -> str:
    """An exception's message as one line of an error: its first line, or its type's name
    where it has no message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
