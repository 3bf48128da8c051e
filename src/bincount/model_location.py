"""Where an exported model lives, from what a user types: `RUN`, `models/RUN`, a model directory or a store URI.

`bincount evaluate` takes all four (a run name needs its `--store`); `bincount serve`, which has no store, takes a
directory or URI as is.
"""

from __future__ import annotations

from pathlib import Path

MODELS = "models"


def resolve_model_location(location: str, store: str | None) -> str:
    """A URI or an existing directory as given; otherwise, with a store, a run name (`RUN` or `models/RUN`) under
    `STORE/models/`."""
    if not store or "://" in location or Path(location).is_dir():
        return location
    run = location.strip("/").removeprefix(f"{MODELS}/")
    return f"{store.rstrip('/')}/{MODELS}/{run}"
