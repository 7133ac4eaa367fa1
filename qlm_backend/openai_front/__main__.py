"""`python -m qlm_backend.openai_front`: the same as `qlm-openai`."""

import sys

from qlm_backend.openai_front.cli import main

sys.exit(main())
