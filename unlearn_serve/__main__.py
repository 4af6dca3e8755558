"""`python -m unlearn_serve ...` is `unlearn-serve ...`."""

import sys

from unlearn_serve.cli import main

sys.exit(main())
