"""`python -m rayft.cluster.cli ...`: the same as the `rayft` command."""
import sys

from . import main

sys.exit(main())
