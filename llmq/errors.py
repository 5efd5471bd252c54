"""Error types. `InputError` is the user's fault (exit code 2, one line); anything else is ours (exit 1)."""


class InputError(Exception):
    """Bad input: missing path, unsupported model, bad option, corrupt file. The CLI exits with code 2."""


class WriteFailure(Exception):
    """The machine refused a write mid-run (disk full, read-only folder): exit code 1 with this message, the
    work folder kept so the same command resumes."""
