"""``python -m dreampeft.dreambooth``: the same CLI as ``train_dreambooth.py`` (the app runs this)."""

import sys

from .cli import main

sys.exit(main())
