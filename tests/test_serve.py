"""The predictor in a real kserve ModelServer on 127.0.0.1 (`bincount serve` in a subprocess), with a small
exported model: V1 and V2 predictions equal the model's offline ones, metadata and readiness answer, every bad
input gets a 4xx with a clear message and the next good request still succeeds, and the upload page works in
headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from bincount.processes import free_port
from serve_support import (CLASSES, ImageServer, drawn_jpeg, export_model, jpeg_claiming, listening_addresses,
                           png_of_size, real_photos)

from bincount.config import ServeConfig
from bincount.devices import inference_precision
from bincount.errors import BincountError
from bincount.model.exported import ExportedModel
from bincount.serve.errors import RequestError
from bincount.serve.images import decode_image
from bincount.serve.local import start
from bincount.serve.predictor import BinCountModel

MAX_BATCH = 8
MAX_BODY = 1 << 20
MAX_PIXELS = 4_000_000
PHOTO = drawn_jpeg(3)


@dataclass
class Server:
    port: int
    model_dir: str
    log: Path

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                chunked: bool = False) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            if chunked:
                conn.request(method, path, body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                             headers=hdrs, encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=hdrs)
            response = conn.getresponse()
            data = response.read()
            return response.status, json.loads(data) if data else {}
        finally:
            conn.close()

    def v1(self, instances: list, **kw) -> tuple[int, dict]:
        return self.request("POST", "/v1/models/bincount:predict", json.dumps({"instances": instances}).encode(), **kw)

    def v2(self, inputs: list) -> tuple[int, dict]:
        return self.request("POST", "/v2/models/bincount/infer", json.dumps({"id": "r1", "inputs": inputs}).encode())

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def binary(self, body: bytes, header_length: int | None = None) -> tuple[int, dict]:
        """A V2 request in the binary tensor data extension: a JSON header (its length in a header), raw bytes."""
        length = len(body.split(b"}]}", 1)[0]) + 3 if header_length is None else header_length
        return self.request("POST", "/v2/models/bincount/infer", body,
                            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(length)})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image(data: bytes) -> dict:
    return {"image": {"b64": b64(data)}}


@pytest.fixture(scope="module")
def photos() -> list[tuple[bytes, int]]:
    """Real ABID photos where ../shared is present (the model's head is trained on them), else none."""
    sample = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "abid-sample"
    return real_photos(sample, per_class=6) if (sample / "metadata").is_dir() else []


@pytest.fixture(scope="module")
def image_server():
    server = ImageServer(PHOTO, big_bytes=3 << 20, slow_s=3.0)
    yield server
    server.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, photos) -> str:
    return export_model(tmp_path_factory.mktemp("model"), photos)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir, image_server, trap) -> Server:
    root = tmp_path_factory.mktemp("serve")
    cfg = ServeConfig(model=model_dir, port=0, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS,
                      url_hosts=["127.0.0.1", "localhost"], url_timeout=2.0,
                      unsafe_url_addresses=[f"127.0.0.1:{image_server.port}"])
    local = start(cfg, root / "server")
    try:
        yield Server(local.port, model_dir, local.log)
    finally:
        local.stop()


def test_loads_a_model_from_a_store_uri(s3_env, model_dir, photos):
    uri = export_model(f"s3://{s3_env.new_bucket('models')}", photos)
    local = BinCountModel(ServeConfig(model=model_dir, max_batch=2))
    remote = BinCountModel(ServeConfig(model=uri, max_batch=2))
    answers = []
    for model in (local, remote):
        model.load()
        try:
            answers.append(asyncio.run(model({"instances": [image(PHOTO)]}))[0]["predictions"][0])
        finally:
            model.stop()
    assert answers[0]["count"] in CLASSES and sum(answers[0]["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    assert answers[1] == answers[0]


def test_local_start_reports_why_the_server_did_not_start(tmp_path):
    with pytest.raises(BincountError, match=f"no exported model at {tmp_path}/missing"):
        start(ServeConfig(model=str(tmp_path / "missing"), port=0), tmp_path / "server")


def test_starting_again_in_the_same_workdir_replaces_the_server(tmp_path):
    """A redeploy replaces the running predictor, as an updated InferenceService does; a server started in
    another workdir is left alone."""
    model = export_model(tmp_path / "store", [])
    first = start(ServeConfig(model=model, port=0), tmp_path / "deploy")
    other = start(ServeConfig(model=model, port=0), tmp_path / "elsewhere")
    second = None
    try:
        second = start(ServeConfig(model=model, port=0), tmp_path / "deploy")
        assert first.proc.wait(timeout=30) is not None
        assert other.proc.poll() is None and second.proc.poll() is None
        assert (tmp_path / "deploy" / "serve.pid").read_text().strip() == str(second.proc.pid)
        status = http.client.HTTPConnection("127.0.0.1", second.port, timeout=10)
        status.request("GET", "/v2/models/bincount/ready")
        assert status.getresponse().status == 200
    finally:
        for server in (first, other, second):
            if server:
                server.stop()


def test_a_local_server_listens_on_loopback_only(server):
    """What `bincount serve` and the local deploy start is reachable from this machine, not from the network."""
    assert listening_addresses(server.port) == {"127.0.0.1"}


def test_host_names_the_address_to_listen_on(model_dir, tmp_path):
    """The serving image and KServe's container listen on every interface, with --host 0.0.0.0."""
    local = start(ServeConfig(model=model_dir, port=0, host="0.0.0.0"), tmp_path / "server")
    try:
        assert listening_addresses(local.port) == {"0.0.0.0"}
    finally:
        local.stop()


@pytest.fixture(scope="module")
def offline(server):
    """The exported model as loaded for evaluation, run plainly in fp32 in this process on the same pixels."""
    model = ExportedModel.load(server.model_dir)
    pre = model.preprocessing

    def predict(datas: list[bytes]) -> torch.Tensor:
        x = pre.normalize(torch.stack([pre.read(d, MAX_PIXELS) for d in datas]), torch.device("cpu"))
        with torch.no_grad():
            return model.net(x).softmax(1)

    return predict


def tolerance() -> float:
    """The server runs at its default precision: bf16 where the CPU computes it natively, else fp32."""
    return 0.05 if inference_precision("auto", torch.device("cpu")) == "bf16" else 1e-4


def v1_probabilities(prediction: dict) -> list[float]:
    assert list(prediction["probabilities"]) == [str(c) for c in CLASSES]
    return list(prediction["probabilities"].values())


def assert_matches(predictions: list[dict], expected: torch.Tensor) -> None:
    """Counts equal wherever the offline answer is not a near tie (at most a tenth of them may be); the
    probabilities are equal within the precision's tolerance."""
    got = torch.tensor([v1_probabilities(p) for p in predictions])
    assert torch.allclose(got, expected, atol=tolerance()), (got - expected).abs().max()
    top2 = expected.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1
    assert clear.float().mean() >= 0.9, "the test model is too unsure of these photos to compare counts"
    counts = torch.tensor([p["count"] for p in predictions])
    want = torch.tensor([CLASSES[i] for i in expected.argmax(1).tolist()])
    assert torch.equal(counts[clear], want[clear])
    assert torch.equal(counts, torch.tensor([CLASSES[i] for i in got.argmax(1).tolist()]))


def test_metadata_and_readiness(server):
    assert server.get("/v2/health/live") == (200, {"live": True})
    assert server.get("/v2/health/ready") == (200, {"ready": True})
    assert server.get("/v1/models/bincount") == (200, {"name": "bincount", "ready": True})
    assert server.get("/v2/models/bincount/ready") == (200, {"name": "bincount", "ready": True})
    assert server.get("/v1/models")[1] == {"models": ["bincount"]}
    status, meta = server.get("/v2/models/bincount")
    assert status == 200 and meta["name"] == "bincount"
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                              {"name": "url", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "count", "datatype": "INT32", "shape": [-1]},
                               {"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]}]
    assert server.get("/v2/models/nope/ready")[0] == 404
    assert server.get("/") == (200, {"status": "alive"})


def test_v1_real_photos_match_offline(server, offline, photos, abid_sample):
    datas = [d for d, _ in photos]
    expected = offline(datas)
    singles = []
    for d in datas:
        status, body = server.v1([image(d)])
        assert status == 200, body
        singles += body["predictions"]
    assert_matches(singles, expected)
    accuracy = sum(p["count"] == label for p, (_, label) in zip(singles, photos)) / len(photos)
    assert accuracy >= 0.9, f"the head was trained on these photos, yet the server gets {accuracy:.0%} right"


def test_v1_batch_and_concurrent_requests(server, offline, photos):
    datas = ([d for d, _ in photos] or [drawn_jpeg(s) for s in range(12)])[:MAX_BATCH]
    expected = offline(datas)
    status, body = server.v1([image(d) for d in datas])
    assert status == 200 and len(body["predictions"]) == len(datas)
    assert_matches(body["predictions"], expected)
    # Concurrent single requests share forward passes in the server; each must still get its own answer.
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: server.v1([image(datas[i % len(datas)])]), range(32)))
    assert all(status == 200 for status, _ in answers)
    assert_matches([body["predictions"][0] for _, body in answers],
                   expected[torch.arange(32) % len(datas)])


def test_json_with_a_charset(server):
    status, body = server.v1([image(PHOTO)], headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200 and body["predictions"][0] == server.v1([image(PHOTO)])[1]["predictions"][0]
    status, body = server.request("POST", "/v1/models/bincount:predict", b"{nope",
                                  {"Content-Type": "application/json; charset=utf-8"})
    assert status == 400 and "not JSON" in body["error"]


def test_v2_bytes(server, offline, photos):
    datas = ([d for d, _ in photos] or [drawn_jpeg(s) for s in range(3)])[:3]
    expected = offline(datas)
    for shape, data in (([3], [b64(d) for d in datas]), ([3, 1], [[b64(d)] for d in datas])):
        status, body = server.v2([{"name": "image", "shape": shape, "datatype": "BYTES", "data": data}])
        assert status == 200, body
        assert body["id"] == "r1" and body["model_name"] == "bincount"
        outputs = {o["name"]: o for o in body["outputs"]}
        assert (outputs["count"]["datatype"], outputs["count"]["shape"]) == ("INT32", [3])
        assert (outputs["probabilities"]["datatype"], outputs["probabilities"]["shape"]) == ("FP32", [3, 5])
        probabilities = torch.tensor(outputs["probabilities"]["data"]).view(3, 5)
        assert_matches([{"count": c, "probabilities": dict(zip(map(str, CLASSES), p))}
                        for c, p in zip(outputs["count"]["data"], probabilities.tolist())], expected)


def test_kserves_own_rest_client_v1_and_v2(server, offline, photos):
    """kserve's InferenceRESTClient as a user writes it: V2 with BYTES as raw image files (the binary data
    extension, its default), V2 with base64 strings in JSON, and V1."""
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    datas = ([d for d, _ in photos] or [drawn_jpeg(s) for s in range(3)])[:3]
    expected = offline(datas)
    base = f"http://127.0.0.1:{server.port}"

    def v2_request(values: list, binary: bool) -> InferRequest:
        tensor = InferInput("image", [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
        return InferRequest("bincount", [tensor])

    async def ask() -> tuple[list, dict]:
        v2, v1 = InferenceRESTClient(RESTConfig(protocol="v2")), InferenceRESTClient(RESTConfig(protocol="v1"))
        try:
            answers = [await v2.infer(base, v2_request(datas, binary=True), model_name="bincount"),
                       await v2.infer(base, v2_request([b64(d) for d in datas], binary=False), model_name="bincount")]
            return answers, await v1.infer(base, {"instances": [image(d) for d in datas]}, model_name="bincount")
        finally:
            await v2.close()
            await v1.close()

    v2_answers, v1_answer = asyncio.run(ask())
    assert_matches(v1_answer["predictions"], expected)
    for answer in v2_answers:
        outputs = {o.name: o.as_numpy() for o in answer.outputs}
        assert_matches([{"count": int(c), "probabilities": dict(zip(map(str, CLASSES), p.tolist()))}
                        for c, p in zip(outputs["count"], outputs["probabilities"])], expected)


def test_url_instances(server, offline, image_server, trap):
    status, body = server.v1([{"url": f"{image_server.base}/photo.jpg"}, image(PHOTO)])
    assert status == 200, body
    by_url, by_b64 = body["predictions"]
    assert by_url == by_b64
    status, body = server.v2([{"name": "url", "shape": [1], "datatype": "BYTES",
                               "data": [f"{image_server.base}/redirect"]}])
    assert status == 200, body
    for url in (f"http://localhost:{trap.port}/photo.jpg", f"http://127.0.0.1:{trap.port}/photo.jpg",
                f"{image_server.base}/redirect-to?url=http://127.0.0.1:{trap.port}/x",
                "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/bin.jpg"):
        status, body = server.v1([{"url": url}])
        assert status == 403, (url, body)
    assert trap.connections == 0


def v2_input(name="image", datatype="BYTES", shape=(1,), data=None) -> list[dict]:
    return [{"name": name, "datatype": datatype, "shape": list(shape), "data": data if data is not None
             else [b64(PHOTO)]}]


BAD_INPUTS = {
    "invalid base64": (lambda s: s.v1([{"image": {"b64": "not*base64!"}}]), 400, "invalid base64"),
    "non-image bytes": (lambda s: s.v1([image(b"%PDF-1.4 certainly not a photo")]), 400, "not an image"),
    "truncated JPEG": (lambda s: s.v1([image(PHOTO[: len(PHOTO) // 2])]), 400, "truncated or corrupt"),
    "corrupt JPEG header": (lambda s: s.v1([image(PHOTO[:200])]), 400, "truncated or corrupt"),
    "JPEG header claiming more pixels than its data": (lambda s: s.v1([image(jpeg_claiming(PHOTO, 2000, 1500))]),
                                                       400, "truncated or corrupt"),
    "empty image": (lambda s: s.v1([{"image": {"b64": ""}}]), 400, "empty"),
    "over the pixel cap": (lambda s: s.v1([image(png_of_size(2500, 2000))]), 413, "over the limit of 4.0 Mpx"),
    "decompression bomb": (lambda s: s.v1([image(png_of_size(20000, 20000))]), 413, "decompression bomb"),
    "oversized body": (lambda s: s.v1([image(b"\xff" * MAX_BODY)]), 413, "request body"),
    "oversized chunked body": (lambda s: s.v1([image(b"\xff" * MAX_BODY)], chunked=True), 413, "request body"),
    "empty batch": (lambda s: s.v1([]), 400, "no instances"),
    "oversized batch": (lambda s: s.v1([image(PHOTO)] * (MAX_BATCH + 1)), 413, "limit of 8"),
    "not JSON": (lambda s: s.request("POST", "/v1/models/bincount:predict", b"{instances"), 400, "format"),
    "not a JSON object": (lambda s: s.request("POST", "/v1/models/bincount:predict", b"[1, 2]"), 400, "instances"),
    "raw image body": (lambda s: s.request("POST", "/v1/models/bincount:predict", PHOTO,
                                           {"Content-Type": "image/jpeg"}), 415, "JSON"),
    "wrong instance form": (lambda s: s.v1([{"image": b64(PHOTO)}]), 400, "expected"),
    "URL not allowlisted": (lambda s: s.v1([{"url": "http://example.com/bin.jpg"}]), 403, "allowlist"),
    "V2 wrong datatype": (lambda s: s.v2(v2_input(datatype="FP32", data=[1.0])), 400, "datatype must be BYTES"),
    "V2 wrong shape": (lambda s: s.v2(v2_input(shape=(2,))), 400, "needs 2 string element"),
    "V2 wrong rank": (lambda s: s.v2(v2_input(shape=(1, 1, 1))), 400, "shape must be"),
    "V2 wrong input name": (lambda s: s.v2(v2_input(name="input-0")), 400, "named image"),
    "V2 two inputs": (lambda s: s.v2(v2_input() + v2_input(name="url")), 400, "one input"),
    "V2 empty": (lambda s: s.v2(v2_input(shape=(0,), data=[])), 400, "no elements"),
    "V2 invalid base64": (lambda s: s.v2(v2_input(data=["%%%"])), 400, "invalid base64"),
    "V2 malformed body": (lambda s: s.request("POST", "/v2/models/bincount/infer", b'{"inputs": 3}'), 422,
                          "inference request"),
    "V2 not JSON": (lambda s: s.request("POST", "/v2/models/bincount/infer", b'{inputs'), 422, "JSON"),
    "unknown model": (lambda s: s.request("POST", "/v2/models/nope/infer", json.dumps(
        {"inputs": v2_input()}).encode()), 404, "nope does not exist"),
    "V2 binary header past the body": (lambda s: s.binary(b'{"inputs": []}', header_length=99), 400,
                                       "Inference-Header-Content-Length"),
    "V2 binary data past the body": (lambda s: s.binary(binary_header(100) + b"short"), 400, "runs past"),
    "V2 binary element past its data": (lambda s: s.binary(binary_header(8) + (1000).to_bytes(4, "little") +
                                                           b"1234"), 400, "runs past"),
    "V2 binary bytes after the data": (lambda s: s.binary(binary_header(0) + b"extra"), 400, "after"),
    "V2 binary non-image bytes": (lambda s: s.binary(binary_header(8) + (4).to_bytes(4, "little") + b"%PDF"),
                                  400, "not an image"),
    "V2 binary FP32 input": (lambda s: s.binary(binary_header(4, datatype="FP32") + b"\0\0\0\0"), 400,
                             "BYTES inputs only"),
}


def binary_header(size: int, datatype: str = "BYTES") -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": datatype,
                                   "parameters": {"binary_data_size": size}}]}).encode()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_4xx_and_the_server_carries_on(server, case):
    """...and one WARNING line in the server's log, no ERROR and no traceback: the client erred, not the server."""
    send, status, words = BAD_INPUTS[case]
    logged = server.log.stat().st_size
    got, body = send(server)
    assert got == status, body
    message = body.get("error") or json.dumps(body.get("detail"))
    assert words in message, message
    log = new_log_lines(server.log, logged)
    assert not [line for line in log if " ERROR " in line or "Traceback" in line], log
    warnings_ = [line for line in log if " WARNING " in line]
    assert len(warnings_) == 1 and f"refused ({status})" in warnings_[0], log
    status, body = server.v1([image(PHOTO)])
    assert status == 200 and body["predictions"][0]["count"] in CLASSES


def test_a_jpeg_whose_header_claims_4000x6000_is_refused_as_truncated():
    """The case a user hit, at the default pixel cap: the header's size is allowed, the data cannot fill it."""
    with pytest.raises(RequestError) as refused:
        decode_image(jpeg_claiming(PHOTO, 4000, 6000), 64, ServeConfig(model="").max_pixels, "instances[0]")
    assert refused.value.status == 400 and "truncated or corrupt" in refused.value.reason


def new_log_lines(log: Path, offset: int) -> list[str]:
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace").splitlines()


def test_a_422_echoes_little_of_a_large_invalid_v2_body(server):
    """A schema error names where the body is wrong and shows a short excerpt, not the body itself."""
    body = json.dumps({"id": "big", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                "data": "A" * 900_000}]}).encode()
    logged = server.log.stat().st_size
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", "/v2/models/bincount/infer", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        status, answer = response.status, response.read()
    finally:
        conn.close()
    assert status == 422 and len(answer) < 4096, (status, len(answer))
    detail = json.loads(answer)
    assert "inputs" in detail["error"] and "data" in json.dumps(detail["detail"])
    log = new_log_lines(server.log, logged)
    assert sum(len(line) for line in log) < 4096 and not any(" ERROR " in line for line in log), log


def chromium() -> tuple[str, str]:
    paths = (shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver")
    missing = [p for p in paths if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"headless Chromium is not installed ({', '.join(missing)} missing); "
                    "apt-get install chromium chromium-driver")
    return paths


def test_upload_page_in_headless_chromium(server, tmp_path):
    browser, driver_path = chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "bin.jpg"
    photo.write_bytes(PHOTO)
    expected = server.v1([image(PHOTO)])[1]["predictions"][0]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        assert "How many items" in driver.find_element(By.TAG_NAME, "h1").text
        driver.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "count").text
                                        or d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "error").text == ""
        assert driver.find_element(By.ID, "count").text == str(expected["count"])
        bars = driver.find_elements(By.CSS_SELECTOR, "#bars .bar")
        shown = {b.get_attribute("data-count"): float(b.get_attribute("data-probability")) for b in bars}
        assert shown == pytest.approx({k: v for k, v in expected["probabilities"].items()}, abs=1e-6)
        assert driver.find_element(By.CSS_SELECTOR, "#bars .bar.top").get_attribute("data-count") == \
            str(expected["count"])
        widths = [b.size["width"] for b in bars]
        assert max(widths) == widths[CLASSES.index(expected["count"])] > 0
    finally:
        driver.quit()


@pytest.mark.parametrize("args, words", [
    (["--model", "{tmp}/missing"], "no exported model at"),
    (["--model", "{model}", "--max-batch", "0"], "max_batch must be at least 1"),
    (["--model", "{model}", "--precision", "fp16", "--device", "cpu"], "unknown precision 'fp16'"),
    (["--model", "{model}", "--unsafe-allow-url-address", "localhost"], "not IP:PORT"),
])
def test_serve_cli_refuses_bad_options_in_one_line(server, tmp_path, capsys, monkeypatch, args, words):
    from bincount.cli import main
    from bincount.serve import predictor

    def must_not_start(*_, **__):
        raise AssertionError("the server started despite a bad option")

    monkeypatch.setattr(predictor.web, "Server", must_not_start)

    argv = ["serve", *(a.format(tmp=tmp_path, model=server.model_dir) for a in args), "--port", str(free_port())]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("bincount: error: ") and words in err and err.count("\n") == 1, err


def _must_not_run(*_, **__):
    raise AssertionError("the server loaded the model or started despite a bad port")


@pytest.mark.parametrize("port", ["65536", "99999", "0", "-1", "http"])
def test_serve_refuses_a_port_outside_1_to_65535_before_loading_the_model(port, server, capsys, monkeypatch):
    from bincount.cli import main
    from bincount.serve import predictor

    monkeypatch.setattr(predictor.BinCountModel, "load", _must_not_run)
    monkeypatch.setattr(predictor.web, "Server", _must_not_run)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--model", server.model_dir, "--port", port])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --port: expected a TCP port 1-65535" in err and "Traceback" not in err, err


def test_serve_refuses_a_config_files_port_outside_1_to_65535_in_one_line(server, tmp_path, capsys, monkeypatch):
    from bincount.cli import main
    from bincount.serve import predictor

    monkeypatch.setattr(predictor.BinCountModel, "load", _must_not_run)
    monkeypatch.setattr(predictor.web, "Server", _must_not_run)
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {server.model_dir}\nport: 99999\n")
    assert main(["serve", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err == "bincount: error: serve: port must be between 1 and 65535, got 99999\n", err
