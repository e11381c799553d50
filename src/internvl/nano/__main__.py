"""`python -m internvl.nano VERB`: the same verbs as `internvl nano VERB`."""

import sys

from .cli import main

sys.exit(main())
