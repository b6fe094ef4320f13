"""``python -m cryosphere``: the ``cryosphere`` command, also under
``torchrun --nproc_per_node N -m cryosphere ...``."""

import sys

from cryosphere.cli import main

if __name__ == "__main__":
    sys.exit(main())
