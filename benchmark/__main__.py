"""``python -m benchmark`` is ``bench``: how a sweep starts its runs with the interpreter it runs in."""

import sys

from benchmark.cli import main

sys.exit(main())
