"""Exceptions shown to users without a traceback (the CLI prints ``error: <message>`` and exits 2)."""


class UserError(Exception):
    """Something the user can fix; the message names the file/tensor/field and the fix."""
