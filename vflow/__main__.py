"""``python -m vflow`` = the ``vflow`` command line."""

import sys

from vflow.cli import main

sys.exit(main())
