"""The one exception type the CLI and the app turn into a one-line message (no traceback)."""


class UserError(Exception):
    """Bad input or a missing / mismatched artifact; the message says what to do."""
