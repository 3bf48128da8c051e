"""Evaluation: the metrics against hand-computed values, the KFP confusion-matrix shape, and `bincount evaluate`
on a model the trainer exported."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from bincount.cli import main
from bincount.data.abid import image_key
from bincount.data.dataset import load_split, map_in_order
from bincount.evaluate import kfp_confusion_matrix
from bincount.metrics import calibration, counting
from bincount.model.exported import ExportedModel
from bincount.store import open_store
from bincount.train.loop import train
from training_data import DATASET, make_store, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_metrics_match_hand_computed_values():
    truth = [1, 1, 2, 2, 3, 5]
    predicted = [1, 2, 2, 2, 5, 4]
    m = counting(truth, predicted, [1, 2, 3, 4, 5])
    assert m["samples"] == 6 and m["accuracy"] == pytest.approx(3 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0],
                                     [0, 0, 0, 1, 0]]
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0 + 0) / 4)      # class 4 has no support
    assert m["mae"] == pytest.approx((0 + 1 + 0 + 0 + 2 + 1) / 6)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 4 + 1) / 6))
    assert m["within_one_accuracy"] == pytest.approx(5 / 6)
    assert m["per_class"]["2"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                   "support": 2}
    assert m["per_class"]["4"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_calibration_metrics_match_hand_computed_values():
    probabilities = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    m = calibration(probabilities, torch.tensor([0, 1, 1, 1]))
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.8)) / 4)
    # bins: 0.6 (wrong), 0.7 (right), 0.8 (right), 0.9 (right), each a quarter of the samples
    assert m["ece"] == pytest.approx((0.6 + 0.3 + 0.2 + 0.1) / 4)


def test_confusion_matrix_has_kfps_classification_metrics_shape():
    dsl = pytest.importorskip("kfp.dsl")
    matrix = [[3, 1], [0, 4]]
    artifact = dsl.ClassificationMetrics(name="metrics")
    artifact.log_confusion_matrix(["1", "2"], matrix)
    assert kfp_confusion_matrix([1, 2], matrix) == artifact.metadata


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store = make_store(tmp_path_factory.mktemp("store"), n=60)
    cache = tmp_path_factory.mktemp("cache")
    train(tiny_config(store, "evalrun", cache, epochs=1))
    return store, cache


def test_a_long_scoring_pass_shows_its_progress_and_a_short_one_stays_quiet(capsys):
    images = TensorDataset(torch.zeros(12, 1), torch.arange(12))

    def slow(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.5)
        return x

    out, y = map_in_order(images, 1, 0, lambda x: x, "score quick")
    assert "score quick" not in capsys.readouterr().err
    out, y = map_in_order(images, 1, 0, slow, "score slow")
    assert "score slow" in capsys.readouterr().err and y.tolist() == list(range(12)) and len(out) == 12


def test_evaluate_writes_metrics_confusion_matrix_and_png(trained, tmp_path, capsys):
    store, cache = trained
    out = tmp_path / "out"
    code = main(["evaluate", "--store", store, "--model", "evalrun", "--dataset", DATASET, "--split", "test",
                 "--out", str(out), "--cache-dir", str(cache), "--workers", "0", "--precision", "fp32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "=" not in captured.out and "accuracy" in captured.out

    metrics = json.loads((out / "metrics.json").read_text())
    items = load_split(open_store(store), DATASET, "test", [1, 2, 3, 4, 5])
    # The same photos through the model's own preprocessing and a plain fp32 forward pass, from the store.
    model = ExportedModel.load(f"{store}/models/evalrun")
    photos = [model.preprocessing.read(open_store(store).get(image_key(item.key))) for item in items]
    with torch.no_grad():
        logits = model.net(model.preprocessing.normalize(torch.stack(photos), torch.device("cpu")))
    probabilities = logits.softmax(1)
    assert metrics == {**metrics, **counting([i.label for i in items], [p + 1 for p in logits.argmax(1).tolist()],
                                             [1, 2, 3, 4, 5])}
    assert metrics["nll"] == pytest.approx(calibration(probabilities, torch.tensor([i.label - 1 for i in items]))[
        "nll"], rel=1e-4)
    assert metrics["samples"] == len(items) and metrics["split"] == "test"
    assert metrics["inference"] == {"tta": "none", "temperature": 1.0, "decode": "argmax"}

    cm = json.loads((out / "confusion_matrix.json").read_text())["confusionMatrix"]
    assert [r["row"] for r in cm["rows"]] == metrics["confusion_matrix"]
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_finds_the_model_by_run_name_models_path_directory_and_uri(trained, tmp_path, s3_env, capsys):
    """The four forms the README names; each evaluates the same model."""
    store, cache = trained
    bucket = s3_env.new_bucket("models")
    for name in ("model.pt", "model.json"):
        open_store(f"s3://{bucket}").put(f"models/evalrun/{name}", (Path(store) / "models/evalrun" / name).read_bytes())
    results = []
    for i, model in enumerate(("evalrun", "models/evalrun", f"{store}/models/evalrun", f"s3://{bucket}/models/evalrun")):
        code = main(["evaluate", "--store", store, "--model", model, "--dataset", DATASET, "--out", str(tmp_path / str(i)),
                     "--cache-dir", str(cache), "--workers", "0"])
        assert code == 0, (model, capsys.readouterr().err)
        metrics = json.loads((tmp_path / str(i) / "metrics.json").read_text())
        assert metrics.pop("model") == model
        results.append(metrics)
    assert all(r == results[0] for r in results)


def test_evaluate_without_a_model_fails_with_one_clear_error(trained, tmp_path, capsys):
    store, cache = trained
    code = main(["evaluate", "--store", store, "--model", "nosuch", "--dataset", DATASET, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("bincount: error:") == 1 and "no exported model" in err and "Traceback" not in err
