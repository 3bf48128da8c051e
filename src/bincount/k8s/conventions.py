"""The conventions every bincount pod follows, as plain data: labels, where the store is and where its keys are
mounted, the trainer's run flag and the metric line's format. No cluster SDK is imported here, so the CLI, the
local tuner (which parses the same metric lines) and the pipeline definitions read them without the `cluster`
extra.
"""

from __future__ import annotations

from bincount.config import ClusterConfig

# Katib's StdOut collector default; the trainer's metric lines (`epoch=3 val_accuracy=0.41`) match it.
METRICS_FORMAT = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
# The trainer's run flag for a launcher: torchrun rejects `--run` after the module as an abbreviation of its own
# `--run-path`, so everything started through torchrun passes `--run-id`.
RUN_FLAG = "--run-id"
S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CREDENTIALS_DIR = "/etc/bincount/s3"            # where pods mount the S3 Secret; the store reads `NAME_FILE`


def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "bincount", "app.kubernetes.io/component": component}


def store_settings(cluster: ClusterConfig) -> dict[str, str]:
    """Where the store is (DESIGN: S3_ENDPOINT, S3_SECURE, AWS_REGION); its credentials live in the S3 Secret."""
    return {"S3_ENDPOINT": cluster.s3_endpoint, "S3_SECURE": "0", "AWS_REGION": cluster.region}
