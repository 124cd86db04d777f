"""``python -m benchmarks``: the op benchmark (see ``benchmarks.run``)."""
import sys

from .run import main

sys.exit(main())
