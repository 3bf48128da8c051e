"""Training: the DDP trainer (`loop`), models, transforms, the feature cache and the training report.

`python -m bincount.train ARGS` and `torchrun ... -m bincount.train ARGS` take the arguments of `bincount train`.
"""
