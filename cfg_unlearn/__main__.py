"""``python -m cfg_unlearn ...``: the ``cfg-unlearn`` console script, for where that
script is not on PATH (a virtual environment used without activating it, a ``pip
install --user`` whose bin folder PATH lacks)."""

from cfg_unlearn.console import console_main

if __name__ == "__main__":
    console_main()
