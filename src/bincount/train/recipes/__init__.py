"""Named training recipes: YAML files of TrainConfig keys, applied with `bincount train --recipe NAME`."""
