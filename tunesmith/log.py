"""Messages for the person at the terminal. Informational lines go to stderr so that stdout
carries only results (a generated answer, a table) and can be piped."""

import sys


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
