"""`python -m unlearn_serve.cli ...` is `unlearn-serve ...`."""

import sys

from unlearn_serve.cli import main

sys.exit(main())
