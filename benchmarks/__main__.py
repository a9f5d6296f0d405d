"""`python -m benchmarks [--quick] [--cases ...]`: run the benchmark suite (see benchmarks/suite.py)."""

import sys

from .suite import main

sys.exit(main())
