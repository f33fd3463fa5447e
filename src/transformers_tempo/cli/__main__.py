"""`python -m transformers_tempo.cli ...` (and `accelerate launch -m transformers_tempo.cli batch ...`): `tempo`."""

import sys

from . import main

sys.exit(main())
