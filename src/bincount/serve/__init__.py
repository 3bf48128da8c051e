"""The KServe predictor: `bincount serve` runs it in a local ModelServer; the serving image runs the same.

kserve parses `sys.argv` with its own flags when `kserve.model_server` is first imported, and argparse's
prefix matching would read our `--model` as its `--model_name`; so kserve is imported here, once, with an
argv that holds only the program name. Every value the server needs is passed explicitly instead.
"""

import sys

_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve  # noqa: F401
finally:
    sys.argv = _argv
