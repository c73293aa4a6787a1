"""``python -m cli ...``: the same as ``twinserve ...``."""
import sys

from cli.main import main

sys.exit(main())
