"""The one exception type for mistakes a user can fix."""


class FinesmithError(Exception):
    """A user-fixable problem: the message says what, where and how to fix it."""
