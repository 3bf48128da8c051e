"""`python -m bincount.train` / `torchrun -m bincount.train`: the trainer's entry, with the flags of `bincount train`."""

import sys

from bincount.train.entry import main

sys.exit(main(sys.argv[1:]))
