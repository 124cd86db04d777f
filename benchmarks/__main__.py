"""``python -m benchmarks``: the op benchmark (see ``benchmarks.run``); with ``--quick`` (and no
``--shapes``) the quick per-call overhead grid of ``benchmarks.overhead`` follows it."""
import sys

from .run import main, parse_args

argv = sys.argv[1:]
status = main(argv)
if status == 0 and "--quick" in argv and "--shapes" not in argv:
    from . import overhead

    args = parse_args(argv)
    status = overhead.main(["--quick", "--device", args.device, "--allocator", args.allocator])
sys.exit(status)
