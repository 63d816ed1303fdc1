"""The one exception type a user sees.

Anything the user can fix (a missing file, a bad field, an unknown key) is raised as
`UserError` with a one-line message naming the file or field; the CLI prints that line
and exits non-zero instead of showing a traceback. Everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line."""
