"""`bincount pipeline submit`: a compiled pipeline (bin_counting or bin_audit) to a Kubeflow Pipelines server, as
`kfp run create` does."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

from bincount.errors import BincountError


class SubmitFailed(BincountError):
    """The KFP server could not be reached or refused the run."""


def submit(host: str, arguments: dict[str, Any], package: str | None = None, pipeline: str = "bin_counting",
           experiment: str = "bincount", run_name: str | None = None, namespace: str | None = None,
           service_account: str | None = None) -> str:
    """Creates the run and returns a line naming it; without `package` this version's `pipeline` is compiled."""
    import kfp
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError, MaxRetryError

    with tempfile.TemporaryDirectory(prefix="bincount-submit-") as tmp:
        if package is None:
            from kfp import compiler

            from bincount.kfp.pipeline import PIPELINES

            package = str(Path(tmp) / f"{pipeline}.yaml")
            compiler.Compiler().compile(PIPELINES[pipeline], package)
        elif not Path(package).is_file():
            raise SubmitFailed(f"no compiled pipeline at {package}")
        try:
            with warnings.catch_warnings():     # "only works with KFP v2.0.0-beta.2 and later": so do we
                warnings.simplefilter("ignore", FutureWarning)
                client = kfp.Client(host=host, namespace=namespace)
            result = client.create_run_from_pipeline_package(
                package, arguments=arguments, run_name=run_name, experiment_name=experiment, namespace=namespace,
                service_account=service_account)
        except ApiException as e:
            raise SubmitFailed(f"the KFP server at {host} refused the run: {e.status} {e.reason}: "
                               f"{(e.body or '').strip()[:300]}") from None
        except (HTTPError, OSError) as e:
            reason = e.reason if isinstance(e, MaxRetryError) else e
            raise SubmitFailed(f"cannot reach the KFP server at {host}: {reason}") from None
    return f"submitted run {result.run_id} to experiment {experiment!r} at {host}/#/runs/details/{result.run_id}"
