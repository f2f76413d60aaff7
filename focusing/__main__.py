"""`python -m focusing` is the same as the `focusing` command."""

import sys

from focusing.cli import main

sys.exit(main())
