"""The exported model's one home (`bincount.model.exported`): a recipe's test-time augmentation, calibration and
decoding travel in model.json, and training's cache, evaluate and the server turn the same photo into the same
tensor and the same probabilities."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil

import pytest
import torch
from PIL import Image

from bincount.cli import main
from bincount.config import ServeConfig
from bincount.data.abid import image_key
from bincount.data.dataset import BinImages, ImageCache, Item, load_split
from bincount.evaluate import predict_log_probs
from bincount.model.exported import (ExportedModel, Inference, Preprocessing, decode, dihedral_views,
                                     fit_temperature, resolve_location)
from bincount.model import zoo
from bincount.model.zoo import LITE_MEAN, LITE_STD, build_model
from bincount.serve.local import start
from bincount.serve.predictor import BinCountModel
from bincount.store import open_store
from training_data import DATASET, tiny_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES = (1, 2, 3, 4, 5)


def test_dihedral_views_are_the_eight_flips_and_turns():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    views = dihedral_views(x)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert all(sorted(v.flatten().tolist()) == list(range(9)) for v in views)


def test_median_decoding_minimizes_the_expected_count_error():
    p = torch.tensor([[0.4, 0.0, 0.0, 0.0, 0.6], [0.3, 0.3, 0.1, 0.1, 0.2]])
    assert decode(p, "argmax").tolist() == [4, 0]
    assert decode(p, "median").tolist() == [4, 1]


def test_temperature_fit_recovers_a_known_temperature():
    torch.manual_seed(0)
    logits = torch.randn(4000, 5) * 3
    targets = torch.distributions.Categorical(logits=logits / 2.0).sample()     # labels drawn at temperature 2
    assert fit_temperature(logits.log_softmax(1), targets) == pytest.approx(2.0, rel=0.08)


def test_a_run_name_resolves_into_the_store_unless_a_local_model_directory_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "champion").mkdir()                     # a folder that happens to share the run's name
    assert resolve_location("champion", "s3://b") == "s3://b/models/champion"
    assert resolve_location("models/champion/", "s3://b") == "s3://b/models/champion"
    (tmp_path / "champion" / "model.json").write_text("{}")
    assert resolve_location("champion", "s3://b") == "champion"
    assert resolve_location(str(tmp_path / "elsewhere"), "s3://b") == str(tmp_path / "elsewhere")
    assert resolve_location("file:///m", "s3://b") == "file:///m" and resolve_location("champion", None) == "champion"


def test_the_server_and_evaluate_feed_the_network_the_same_tensor_for_real_photos(abid_sample, tmp_path):
    """No train/serve skew: the tensor the server computes from a photo's bytes equals, exactly, the one in the
    cache that training and evaluate read — for the real sample photos and for a phone-sized photo, which both
    paths decode in JPEG draft mode. The tolerance is 0: both call the same function on the same bytes."""
    store = open_store(str(tmp_path / "store"))
    keys = sorted(p.stem for p in (abid_sample / "bin-images").glob("*.jpg"))[:24]
    for key in keys:
        store.put(image_key(key), (abid_sample / "bin-images" / f"{key}.jpg").read_bytes())
    big = io.BytesIO()
    Image.open(abid_sample / "bin-images" / f"{keys[0]}.jpg").resize((3000, 2250)).save(big, "JPEG", quality=92)
    store.put(image_key("phone"), big.getvalue())
    keys.append("phone")

    model, _ = build_model("resnet18", 5, "none")
    ExportedModel(model, "resnet18", CLASSES, Preprocessing(288, LITE_MEAN, LITE_STD), Inference()).save(
        store, "models/skew")
    server = BinCountModel(ServeConfig(model=f"{store.uri}/models/skew"))
    server.load()
    cache = ImageCache(store, tmp_path / "cache", 288)
    cache.fill(keys, 4)
    images = BinImages([Item(key, 1) for key in keys], cache, CLASSES)
    for i, key in enumerate(keys):
        served, _ = server._decode(base64.b64encode(store.get(image_key(key))).decode(), "photo", server.variants[0])
        assert served.shape == (3, 288, 288) and torch.equal(served, images[i][0]), key
    server.stop()


def test_a_recipe_run_exports_tta_and_calibration_and_serve_answers_as_evaluate(store, cache_dir, tmp_path,
                                                                               capsys):
    recipe = tmp_path / "calibrated.yaml"
    recipe.write_text("loss: ordinal\nclass_weights: balanced\ntta: dihedral\ncalibration: temperature\n"
                      "decode: median\nmonitor: val_balanced_accuracy\n")
    code = main(["train", *tiny_args(store, cache_dir, epochs=3), "--recipe", str(recipe), "--run", "calibrated"])
    assert code == 0, capsys.readouterr().err
    model = ExportedModel.load("calibrated", store)
    meta = model.meta
    assert meta["config"]["recipe"] == str(recipe) and meta["config"]["loss"] == "ordinal"
    assert model.inference.tta == "dihedral" and model.inference.decode == "median"
    assert set(meta["validation"]) == {"accuracy", "balanced_accuracy", "mae", "within_one_accuracy", "nll", "ece"}

    # the temperature is the one that fits the validation split as the exported model predicts it
    val = BinImages(load_split(open_store(store), DATASET, "val", CLASSES), ImageCache(open_store(store), cache_dir, 48),
                    CLASSES)
    log_probs, targets = predict_log_probs(model.predictor(torch.device("cpu"), "fp32"), val, 16, 0)
    assert model.inference.temperature == fit_temperature(log_probs, targets) != 1.0

    # evaluate's probabilities for each test photo, then the endpoint's for the same photos
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--store", store, "--model", "calibrated", "--dataset", DATASET, "--out", str(out),
                 "--cache-dir", str(cache_dir), "--workers", "0"]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    server = start(ServeConfig(model=f"{store}/models/calibrated", port=0), tmp_path / "server")
    try:
        answers = []
        for row in rows:                                    # one photo per request: batches of one
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            photo = base64.b64encode(open_store(store).get(image_key(row["key"]))).decode()
            conn.request("POST", "/v1/models/bincount:predict", json.dumps({"instances": [{"image": {"b64": photo}}]}),
                         {"Content-Type": "application/json"})
            answers += json.loads(conn.getresponse().read())["predictions"]
    finally:
        server.stop()
    # Same code, same tensors: measured exactly equal here (bf16, a batch of one against evaluate's whole split);
    # 1e-5 leaves room only for a kernel that blocks a batch differently on other hardware.
    assert len(answers) == len(rows) > 0
    for row, served in zip(rows, answers):
        assert list(served["probabilities"]) == list(row["probabilities"]) and served["count"] == row["count"]
        assert max(abs(a - b) for a, b in zip(served["probabilities"].values(),
                                              row["probabilities"].values())) <= 1e-5, (served, row)
    shutil.rmtree(out)


def test_a_corn_model_exports_its_head_and_loads_to_the_same_answers(store, cache_dir, capsys):
    code = main(["train", *tiny_args(store, cache_dir, epochs=1, head="corn", loss="corn"), "--run", "corn"])
    assert code == 0, capsys.readouterr().err
    model = ExportedModel.load("corn", store)
    assert model.meta["head"] == "corn" and type(zoo.head(model.net)).__name__ == "CornHead"
    items = load_split(open_store(store), DATASET, "test", CLASSES)
    cache = ImageCache(open_store(store), cache_dir, 48)
    cache.fill([item.key for item in items], 4)
    photos = BinImages(items, cache, CLASSES)
    log_probs, _ = predict_log_probs(model.predictor(torch.device("cpu"), "fp32"), photos, 16, 0)
    images = torch.stack([photos[i][0] for i in range(len(photos))])
    with torch.no_grad():
        direct = model.net(model.preprocessing.normalize(images, torch.device("cpu")))
    assert log_probs.exp().sum(1).tolist() == pytest.approx([1.0] * len(photos), abs=1e-5)
    assert torch.allclose(log_probs, direct, atol=1e-4)
