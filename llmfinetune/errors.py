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


def root_cause(exc: BaseException) -> BaseException:
    """The error at the bottom of `exc`'s chain: libraries wrap the real reason in their own (datasets in a
    DatasetGenerationError, dynamo in a BackendCompilerFailed whose first line names only the backend)."""
    seen = set()
    while id(exc) not in seen and (exc.__cause__ or exc.__context__):
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc
