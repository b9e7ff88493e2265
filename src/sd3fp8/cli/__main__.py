"""`python -m sd3fp8.cli`: the same as the `sd3fp8` command."""

import sys

from sd3fp8.cli import main

sys.exit(main())
