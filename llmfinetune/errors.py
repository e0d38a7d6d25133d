"""One exception type for every mistake a user can fix: the CLI prints it without a traceback."""


class UserError(Exception):
    """A problem with the job file, the data or the model that the user can fix.

    The message must say what is wrong, where (file, key or row) and what was expected.
    """

    exit_code = 2
