"""`bincount pipeline submit`: a compiled pipeline (bin_counting or bin_audit) to a Kubeflow Pipelines server, as
`kfp run create` does, or on a schedule, as `kfp recurring-run create` does (the nightly audit over N pods)."""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

from bincount.errors import BincountError


class SubmitFailed(BincountError):
    """The KFP server could not be reached or refused the run."""


CRON_FIELD = re.compile(r"[0-9A-Za-z*?/,-]+")


def cron_expression(text: str) -> str:
    """KFP schedules take six cron fields, seconds first; crontab's five (a CronJob's) get second 0."""
    fields = text.split()
    if len(fields) not in (5, 6) or not all(CRON_FIELD.fullmatch(f) for f in fields):
        raise ValueError(f"expected a cron expression of 5 fields (minute hour day month weekday) or 6 "
                         f"(seconds first), got {text!r}")
    return " ".join(["0", *fields] if len(fields) == 5 else fields)


def submit(host: str, arguments: dict[str, Any], package: str | None = None, pipeline: str = "bin_counting",
           experiment: str = "bincount", run_name: str | None = None, namespace: str | None = None,
           service_account: str | None = None, schedule: str | None = None) -> str:
    """Creates the run, or with `schedule` (a KFP cron expression) a recurring run that never overlaps itself or
    catches up on missed nights, and returns a line naming it; without `package` this version's `pipeline` is
    compiled."""
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
            if schedule:
                experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
                job = client.create_recurring_run(
                    experiment_id, run_name or f"{pipeline}-scheduled", cron_expression=schedule, max_concurrency=1,
                    no_catchup=True, params=arguments, pipeline_package_path=package,
                    service_account=service_account)
            else:
                result = client.create_run_from_pipeline_package(
                    package, arguments=arguments, run_name=run_name, experiment_name=experiment,
                    namespace=namespace, service_account=service_account)
        except ApiException as e:
            what = "recurring run" if schedule else "run"
            raise SubmitFailed(f"the KFP server at {host} refused the {what}: {e.status} {e.reason}: "
                               f"{(e.body or '').strip()[:300]}") from None
        except (HTTPError, OSError) as e:
            reason = e.reason if isinstance(e, MaxRetryError) else e
            raise SubmitFailed(f"cannot reach the KFP server at {host}: {reason}") from None
    if schedule:
        return (f"scheduled recurring run {job.recurring_run_id} ({schedule}) in experiment {experiment!r} at "
                f"{host}/#/recurringrun/details/{job.recurring_run_id}")
    return f"submitted run {result.run_id} to experiment {experiment!r} at {host}/#/runs/details/{result.run_id}"
