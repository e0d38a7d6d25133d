"""One exception type for every mistake a user can fix: the CLI prints it without a traceback."""


class UserError(Exception):
    """A problem with the job file, the data or the model that the user can fix.

    The message must say what is wrong, where (file, key or row) and what was expected.
    """

    exit_code = 2


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a library's error message, for quoting in ours; some raise with no message at all."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
