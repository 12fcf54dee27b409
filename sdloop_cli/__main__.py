"""``python -m sdloop_cli ...`` (and ``accelerate launch -m sdloop_cli train ...``) runs the command line."""

import sys

from sdloop_cli.main import main

sys.exit(main())
