"""What a person at the terminal sees: progress lines, and one-line errors for requests that cannot work."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

PREFIX = "[lightning_pieg]"
USER_ERROR_EXIT = 2


class UserError(ValueError):
    """A request that cannot work (a bad value, a missing file, a hostile checkpoint): the message names the value
    and the fix, and the command line prints it as one line and exits with status 2, no traceback."""


class Fault(RuntimeError):
    """A failure of the run rather than of the request (an environment worker died): one line, exit status 1."""


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


def fail(message: str, status: int = USER_ERROR_EXIT) -> NoReturn:
    say(f"error: {message}")
    sys.exit(status)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the request's fault. Besides ``UserError``: a replay that does not fit in memory, a
    missing data file, and an OpenGL backend that cannot render."""
    from lightning_pieg.envs.rendering import RenderingError

    return UserError, MemoryError, FileNotFoundError, RenderingError


def run_cli(main: Callable[[], object]) -> object:
    """Run ``main``; a user error becomes one line and exit status 2."""
    try:
        return main()
    except user_errors() as error:
        fail(" ".join(str(error).split()))  # one line, whatever the message's layout
    except Fault as error:
        fail(" ".join(str(error).split()), status=1)
