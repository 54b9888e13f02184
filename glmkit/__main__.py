"""`python -m glmkit ARGS` is the `glmkit` command; so `torchrun --nproc-per-node N -m glmkit serve ...` works."""

import sys

from .cli import main

sys.exit(main())
