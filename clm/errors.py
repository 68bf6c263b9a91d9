"""The one exception type a user sees: a fixable problem, printed as a single line."""


class ClmError(Exception):
    """A problem with the user's input or environment.

    The command-line tools print ``error: <message>`` and exit with status 2 instead of a
    traceback, so the message must name the file or flag involved and say what is wrong.
    """
