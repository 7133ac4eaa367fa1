import sys

from qlm_backend.client.cli import main

sys.exit(main())
