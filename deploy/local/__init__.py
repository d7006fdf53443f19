"""Starts, checks and stops the real infrastructure on this machine, by its own pid files.

    python -m deploy.local up | status | down | demo

Used by `make stack-up`/`make demo` (state under .local/ in the checkout) and by the pytest
fixtures (state under a temporary folder, on free ports, so two runs never collide).
"""
