"""``python -m recurrent_lens``: the ``recurrent-lens`` command (also what ``torchrun -m recurrent_lens`` runs)."""

import os
import sys

from recurrent_lens.cli import main


def _exit_status(code: object) -> int:
    """The status ``sys.exit(code)`` would give (printing a message code to stderr, as it does)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        status = main()
    except SystemExit as e:
        status = e.code
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun every file is written and the process group destroyed by now; interpreter shutdown can
        # still abort a rank ("terminate called without an active exception", SIGABRT) while gloo's threads are
        # torn down, turning a finished run into a failed one, so a rank leaves without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status(status))
    sys.exit(status)
