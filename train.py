"""Alias of the packaged trainer, `python -m graft.train`, for a checkout of this repository:

    accelerate launch train.py --config configs/digits_base.yaml

is the same as `accelerate launch -m graft.train --config configs/digits_base.yaml`.
"""

import sys

from graft.train import main

if __name__ == "__main__":
    sys.exit(main())
