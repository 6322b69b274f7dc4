"""``python -m hf_badm`` (also ``accelerate launch -m hf_badm train RECIPE.yaml``)."""

import sys

from hf_badm.cli import main

sys.exit(main())
