"""bincount: count the items in a warehouse bin from one photo, trained and served on Kubeflow."""

__version__ = "0.1.0"
