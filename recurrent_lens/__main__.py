"""``python -m recurrent_lens``: the ``recurrent-lens`` command (also what ``torchrun -m recurrent_lens`` runs)."""

import sys

from recurrent_lens.cli import main

if __name__ == "__main__":
    sys.exit(main())
