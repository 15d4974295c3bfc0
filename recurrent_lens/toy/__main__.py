"""``python -m recurrent_lens.toy``: rebuild the embedded toy weights."""

from recurrent_lens.toy import _main

_main()
