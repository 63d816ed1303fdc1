"""`python -m benchmarks NAME` (from the repository root): the numbers of BENCHMARKS.md.

Benchmarks live outside the product: they are not in the wheel and not in `fedslm --help`
(which lists what a site operator and a researcher run). They import the product; the
product never imports them.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.cli import add_bench_parser
from fedslm.common.errors import UserError
from slm.quiet import quiet_libraries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="benchmarks, printed as ratios (BENCHMARKS.md says what each measured)")
    add_bench_parser(parser)
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        return args.func(args)
    except UserError as err:
        print(f"benchmarks: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
