"""STUB Kubernetes API server: the one stub this project's tests allow (a test helper, not a fixture file).

No control plane can run here, so the launchers (bincount.k8s.launch and .training_jobs) and the serving backend
talk through the real `kubernetes` client, and through Kubeflow's own clients (the Training SDK's TrainingClient, the
kubeflow SDK's TrainerClient), to this small HTTP server on 127.0.0.1. It answers only what they use: API
discovery, namespaced and cluster-scoped custom-object create / get / list / replace / delete, pod lists (equality
and `in (...)` label selectors), pod logs and config maps, with the API server's status codes and Status bodies.
Each object's `status` is scripted by the test (every GET moves to the next one). The resources the tests create
are the real builders' output; their validity is checked elsewhere against the real CRDs.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from kubernetes import client

SERVED = {
    "kubeflow.org/v1": {"pytorchjobs": "PyTorchJob"},
    "kubeflow.org/v1beta1": {"experiments": "Experiment", "trials": "Trial"},
    "serving.kserve.io/v1beta1": {"inferenceservices": "InferenceService"},
    "batch/v1": {"jobs": "Job"},
    "trainer.kubeflow.org/v1alpha1": {"trainjobs": "TrainJob", "trainingruntimes": "TrainingRuntime",
                                      "clustertrainingruntimes": "ClusterTrainingRuntime"},
}
CLUSTER_SCOPED = {"clustertrainingruntimes"}
CREATED_AT = "2026-01-01T00:00:00Z"
# What a Kubeflow Trainer install publishes, and the TrainerClient reads when it starts.
TRAINER_VERSION = ("kubeflow-system", "kubeflow-trainer-public", {"kubeflow_trainer_version": "v2.3.0"})
CUSTOM = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
                    r"(?:/(?P<name>[^/]+))?$")
CLUSTER_CUSTOM = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$")
DISCOVERY = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)$")
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$")
LOG = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/log$")
CONFIG_MAP = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/configmaps/(?P<name>[^/]+)$")
SET_TERM = re.compile(r"^\s*(?P<key>[^\s=!]+)\s+in\s+\((?P<values>[^)]*)\)\s*$")


class StubKubeAPI:
    """Start with `with StubKubeAPI() as api:`; `api.client()` is an ApiClient pointed at it."""

    def __init__(self) -> None:
        self.served = {gv: dict(resources) for gv, resources in SERVED.items()}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.statuses: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.pods: list[dict[str, Any]] = []
        self.logs: dict[str, str] = {}
        namespace, name, data = TRAINER_VERSION
        self.config_maps: dict[tuple[str, str], dict[str, str]] = {(namespace, name): dict(data)}
        self.forbidden = False
        self.created: list[dict[str, Any]] = []
        self.replaced: list[dict[str, Any]] = []             # PUT bodies: a spec replaced, as `kubectl replace`
        self.versions = 0                                    # the last resourceVersion handed out
        self.deleted: list[tuple[str, str, dict[str, Any] | None]] = []       # plural, name, DeleteOptions
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.stub = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> StubKubeAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def client(self) -> client.ApiClient:
        configuration = client.Configuration(host=self.url)
        configuration.retries = 0
        return client.ApiClient(configuration)

    def script(self, plural: str, name: str, statuses: list[dict[str, Any]]) -> None:
        """The statuses successive GETs of that object return; the last one repeats."""
        self.statuses[(plural, name)] = list(statuses)

    def add(self, body: dict[str, Any]) -> None:
        """An object the cluster already has (for instance the trials Katib created, or Trainer's runtimes)."""
        self.versions += 1
        self.objects[(body["kind"].lower() + "s", body["metadata"]["name"])] = _created(body, self.versions)

    def add_pod(self, name: str, labels: dict[str, str], phase: str = "Running", log: str = "",
                container_statuses: list[dict[str, Any]] | None = None,
                conditions: list[dict[str, Any]] | None = None, container: str = "pytorch") -> None:
        self.pods.append({"metadata": {"name": name, "namespace": "bincount", "labels": labels,
                                       "creationTimestamp": f"2026-01-01T00:00:{len(self.pods):02d}Z"},
                          "spec": {"containers": [{"name": container, "image": "ghcr.io/bincount/trainer:0.1.0"}]},
                          "status": {"phase": phase, "conditions": conditions or [],
                                     # with the fields a kubelet always reports (the clients' models require them)
                                     "containerStatuses": [{"ready": False, "restartCount": 0, "imageID": "", **c}
                                                           for c in container_statuses or []]}})
        self.logs[name] = log


def _created(body: dict[str, Any], version: int) -> dict[str, Any]:
    """What the API server adds to every object it stores: a uid, the creation time and a resourceVersion."""
    metadata = {"uid": f"uid-{body['metadata']['name']}", "creationTimestamp": CREATED_AT, **body["metadata"],
                "resourceVersion": str(version)}
    return {**body, "metadata": metadata}


def _matches(selector: str, labels: dict[str, str]) -> bool:
    """Label selectors as the clients send them: `a=b,c=d` and `key in (x, y)` terms, comma-separated."""
    terms = re.findall(r"[^,(]+(?:\([^)]*\))?", selector)
    for term in (t.strip() for t in terms if t.strip()):
        if m := SET_TERM.match(term):
            if labels.get(m["key"]) not in {v.strip() for v in m["values"].split(",")}:
                return False
        else:
            key, _, value = term.partition("=")
            if labels.get(key) != value:
                return False
    return True


def _status(code: int, message: str, reason: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class _Handler(BaseHTTPRequestHandler):
    server_version = "stub-kube-apiserver"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def stub(self) -> StubKubeAPI:
        return self.server.stub

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PUT(self) -> None:
        self._route("PUT")

    def _verb(self, method: str, name: str | None) -> str:
        return {"POST": "create", "GET": "get" if name else "list", "PUT": "update", "DELETE": "delete"}[method]

    def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self) -> None:
        self._send(404, _status(404, "the server could not find the requested resource", "NotFound"))

    def _route(self, method: str) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        with self.stub._lock:
            if method == "GET" and (m := DISCOVERY.match(url.path)):
                return self._discovery(f"{m['group']}/{m['version']}")
            if m := CUSTOM.match(url.path):
                return self._custom(method, m, body, query)
            if (m := CLUSTER_CUSTOM.match(url.path)) and m["plural"] in CLUSTER_SCOPED:
                return self._custom(method, m, body, query)
            if method == "GET" and (m := PODS.match(url.path)):
                return self._pods(query.get("labelSelector", ""))
            if method == "GET" and (m := LOG.match(url.path)):
                return self._log(m["name"], query)
            if method == "GET" and (m := CONFIG_MAP.match(url.path)):
                return self._config_map(m["ns"], m["name"])
        self._not_found()

    def _discovery(self, group_version: str) -> None:
        resources = self.stub.served.get(group_version)
        if resources is None:
            return self._not_found()
        self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                         "resources": [{"name": plural, "singularName": kind.lower(), "namespaced": True,
                                        "kind": kind, "verbs": ["create", "delete", "get", "list", "watch"]}
                                       for plural, kind in resources.items()]})

    def _custom(self, method: str, m: re.Match[str], body: dict[str, Any] | None, query: dict[str, str]) -> None:
        group, version, plural, name = m["group"], m["version"], m["plural"], m["name"]
        if plural not in self.stub.served.get(f"{group}/{version}", {}):
            return self._not_found()
        if self.stub.forbidden:
            where = f' in the namespace "{m["ns"]}"' if "ns" in m.groupdict() else " at the cluster scope"
            return self._send(403, _status(
                403, f'{plural}.{group} is forbidden: User "system:serviceaccount:bincount:default" cannot '
                     f'{self._verb(method, name)} resource "{plural}" in API group "{group}"{where}', "Forbidden"))
        if method == "POST":
            key = (plural, body["metadata"]["name"])
            if key in self.stub.objects:
                return self._send(409, _status(409, f'{plural}.{group} "{key[1]}" already exists', "AlreadyExists"))
            self.stub.created.append(json.loads(json.dumps(body)))
            self.stub.versions += 1
            self.stub.objects[key] = _created(body, self.stub.versions)
            return self._send(201, self.stub.objects[key])
        if method == "PUT":
            key = (plural, name)
            if key not in self.stub.objects:
                return self._send(404, _status(404, f'{plural}.{group} "{name}" not found', "NotFound"))
            current = self.stub.objects[key]["metadata"]
            if body["metadata"].get("resourceVersion") != current["resourceVersion"]:
                return self._send(409, _status(409, f'Operation cannot be fulfilled on {plural}.{group} "{name}": '
                                                    "the object has been modified", "Conflict"))
            self.stub.replaced.append(json.loads(json.dumps(body)))
            self.stub.versions += 1
            self.stub.objects[key] = {**body, "metadata": {**body["metadata"], "uid": current["uid"],
                                                           "creationTimestamp": current["creationTimestamp"],
                                                           "resourceVersion": str(self.stub.versions)}}
            return self._send(200, self.stub.objects[key])
        if name is None:
            selector = query.get("labelSelector", "")
            items = [o for (p, _), o in self.stub.objects.items()
                     if p == plural and _matches(selector, o["metadata"].get("labels") or {})]
            return self._send(200, {"kind": "List", "apiVersion": f"{group}/{version}", "items": items})
        key = (plural, name)
        if key not in self.stub.objects:
            return self._send(404, _status(404, f'{plural}.{group} "{name}" not found', "NotFound"))
        if method == "DELETE":
            del self.stub.objects[key]
            self.stub.deleted.append((plural, name, body))
            return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        script = self.stub.statuses.get(key) or [{}]
        status = script.pop(0) if len(script) > 1 else script[0]
        self._send(200, {**self.stub.objects[key], "status": status})

    def _pods(self, selector: str) -> None:
        items = [p for p in self.stub.pods if _matches(selector, p["metadata"]["labels"])]
        self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})

    def _config_map(self, namespace: str, name: str) -> None:
        data = self.stub.config_maps.get((namespace, name))
        if data is None:
            return self._send(404, _status(404, f'configmaps "{name}" not found', "NotFound"))
        self._send(200, {"kind": "ConfigMap", "apiVersion": "v1",
                         "metadata": {"name": name, "namespace": namespace}, "data": data})

    def _log(self, pod: str, query: dict[str, str]) -> None:
        if pod not in self.stub.logs:
            return self._send(404, _status(404, f'pods "{pod}" not found', "NotFound"))
        lines = self.stub.logs[pod].splitlines(keepends=True)
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"]):]
        self._send(200, "".join(lines), "text/plain")

