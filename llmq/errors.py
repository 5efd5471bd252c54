"""Error types. `InputError` is the user's fault (exit code 2, one line); anything else is ours (exit 1)."""


class InputError(Exception):
    """Bad input: missing path, unsupported model, bad option, corrupt file. The CLI exits with code 2."""
