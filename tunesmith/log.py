"""Messages for the person at the terminal. Informational lines go to stderr so that stdout
carries only results (a generated answer, a table) and can be piped. In a run of several
processes (torchrun) only rank 0 says them: every rank goes through the same steps."""

import os
import sys


def say(message: str) -> None:
    if os.environ.get("RANK", "0") in ("0", ""):
        print(message, file=sys.stderr, flush=True)
