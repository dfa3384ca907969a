"""``python -m benchmarks.peers``: see :mod:`benchmarks.peers.driver`."""

import sys

from benchmarks.peers.driver import main

sys.exit(main())
