"""``python -m hf_badm`` (also ``accelerate launch -m hf_badm train RECIPE.yaml``): the application, loaded only here."""

import sys

if __name__ == "__main__":
    from hf_badm.app.cli import main

    sys.exit(main())
