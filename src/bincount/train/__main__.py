"""`python -m bincount.train` / `torchrun -m bincount.train`: the same flags as `bincount train`."""

import sys

from bincount.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
