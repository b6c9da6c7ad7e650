"""`python -m kdcache`: the same command line as `kdcache`."""

import sys

from kdcache.cli import main

sys.exit(main())
