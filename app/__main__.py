"""`python -m app ...` is `mozrest-relay ...`."""

import sys

from app.cli import main

sys.exit(main())
