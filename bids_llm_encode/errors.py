"""Exit codes (BEP027 draft, sysexits.h) and the one exception type the CLI turns into a
one-line message."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BIDS_INVALID = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_MATCH = 18
EXIT_USAGE = 64
EXIT_DATA_ERROR = 65
EXIT_MISSING_INPUT = 66
EXIT_CANT_CREATE = 73


class AppError(Exception):
    """An error the user can fix: printed as one line, mapped to an exit code.

    Science modules raise it (or its subclasses) with a message that names the file or
    option and says what to do; the CLI prints ``bids_llm_encode: error: <message>``.
    """

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(AppError):
    exit_code = EXIT_USAGE


class MissingInputError(AppError):
    exit_code = EXIT_MISSING_INPUT


class NoMatchError(AppError):
    exit_code = EXIT_NO_MATCH


class BidsValidationError(AppError):
    exit_code = EXIT_BIDS_INVALID


class InputDataError(AppError):
    """Data that exist but cannot be used as they are (NaN, wrong shape, too short,
    unparseable): exit 65 when found before any work (inside a step the CLI exits 1 and
    names the step)."""

    exit_code = EXIT_DATA_ERROR


class OutputError(AppError):
    """The output, work or log folder cannot be created or written (exit 73)."""

    exit_code = EXIT_CANT_CREATE
