"""Errors a user can fix: the entry points print their one sentence and exit non-zero."""


class UserError(Exception):
    """A bad config, input or environment, explained in one sentence (no traceback)."""
