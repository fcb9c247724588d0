"""User-facing errors: one line that says what is wrong and what to do next."""


class QvlError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints ``str(err)`` as a single line (no traceback) and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class GateFailed(QvlError):
    """A parity gate failed; the report says which stage and by how much."""

    exit_code = 1
