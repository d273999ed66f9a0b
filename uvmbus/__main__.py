"""`python -m uvmbus` = the `uvmbus` command."""

import sys

from uvmbus.services.cli import main

sys.exit(main())
