"""The promotion gate: its statistics on counts with known answers, and `bincount model compare` on a tiny prepared
dataset with two exported models (scored through the exported-model reader, as evaluate scores), its report, its
exit codes and its one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from training_data import DATASET

from bincount import cli
from bincount.config import CompareConfig, GateRule
from bincount.errors import ALERT_EXIT
from bincount.model.exported import ExportedModel, Inference, Preprocessing
from bincount.model.zoo import IMAGENET_MEAN, IMAGENET_STD, build_model
from bincount.rollout.gate import Refused, compare, judge
from bincount.rollout.stats import McNemar, mcnemar, paired_differences
from bincount.store import open_store

CLASSES = [1, 2, 3, 4, 5]


def save_model(store: str, run: str, seed: int, dataset: str = DATASET, classes=CLASSES) -> None:
    """An untrained resnet18 at 48 px, exported as training exports, as `run` trained on `dataset`."""
    torch.manual_seed(seed)
    net, _ = build_model("resnet18", len(classes), "none")
    ExportedModel(net, "resnet18", classes, Preprocessing(48, IMAGENET_MEAN, IMAGENET_STD), Inference(),
                  {"config": {"run": run, "dataset": dataset}, "metrics": {}}).save(open_store(store), f"models/{run}")


def test_identical_answers_differ_by_nothing_with_an_interval_of_nothing():
    truth = [1, 2, 3, 4, 5] * 10
    guess = [1, 1, 3, 5, 5] * 10
    for d in paired_differences(truth, guess, guess, [str(i) for i in range(50)], CLASSES, 0.95, 500, 0):
        assert d.delta == 0 and d.low == 0 and d.high == 0
    assert mcnemar(truth, guess, guess) == McNemar(0, 0, 30, 20) and McNemar(0, 0, 30, 20).p_value == 1.0


def test_a_worse_challenger_gets_an_interval_on_the_worse_side_and_the_rule_refuses_it():
    rng = np.random.default_rng(0)
    truth = rng.integers(1, 6, 400)
    champion = np.where(rng.random(400) < 0.8, truth, rng.integers(1, 6, 400))
    challenger = np.where(rng.random(400) < 0.4, truth, rng.integers(1, 6, 400))
    differences = paired_differences(truth, champion, challenger, [str(i) for i in range(400)], CLASSES, 0.95, 2000, 0)
    by = {d.metric: d for d in differences}
    assert by["accuracy"].high < 0 and by["balanced_accuracy"].high < 0 and by["mae"].low > 0
    assert by["accuracy"].champion == pytest.approx(np.mean(champion == truth))
    assert by["mae"].challenger == pytest.approx(np.mean(abs(challenger - truth)))
    checks = judge(GateRule(), differences)
    assert [(c.rule, c.passed) for c in checks] == [("min_accuracy", True), ("mae", False),
                                                  ("balanced_accuracy", False)]
    test = mcnemar(truth, champion, challenger)
    assert test.champion_only > test.challenger_only and test.p_value < 1e-6


def test_photos_of_one_bin_are_resampled_together_which_widens_the_interval():
    """Two photos of each bin, answered alike: as 200 independent photos the interval is narrower than it has a
    right to be; as 100 bins it is the width of 100 observations."""
    rng = np.random.default_rng(1)
    truth = np.repeat(rng.integers(1, 6, 100), 2)
    champion = np.repeat(np.where(rng.random(100) < 0.6, truth[::2], 1), 2)
    challenger = np.repeat(np.where(rng.random(100) < 0.6, truth[::2], 1), 2)
    photos = paired_differences(truth, champion, challenger, [str(i) for i in range(200)], CLASSES, 0.95, 2000, 0)
    bins = paired_differences(truth, champion, challenger, [str(i // 2) for i in range(200)], CLASSES, 0.95, 2000, 0)
    width = {d.metric: d.high - d.low for d in photos}
    assert all(d.high - d.low > 1.25 * width[d.metric] for d in bins)


@pytest.fixture(scope="module")
def models(store) -> str:
    save_model(store, "champ", 0)
    save_model(store, "chall", 1)
    save_model(store, "three", 2, classes=[1, 2, 3])
    save_model(store, "other", 3, dataset="tiny-copy")
    s = open_store(store)
    for split in ("train", "val", "test"):             # a second dataset whose training photos are tiny's test photos
        s.put_text(f"datasets/tiny-copy/{split}.jsonl", s.get_text(f"datasets/{DATASET}/test.jsonl"))
    return store


def test_compare_scores_both_models_on_the_same_photos_and_writes_the_report(models, cache_dir):
    result = compare(CompareConfig(store=models, champion="champ", challenger="chall", dataset=DATASET,
                                   cache_dir=str(cache_dir), rule=GateRule(mae_margin=5, balanced_accuracy_margin=1)))
    test = [json.loads(line) for line in open_store(models).get_text(f"datasets/{DATASET}/test.jsonl").splitlines()]
    assert result.photos == len(test) and result.passed
    assert result.decision.startswith("passed every rule: challenger accuracy")
    out = open_store(result.uri)
    assert result.uri == f"{models}/reports/chall/compare-champ"
    summary = json.loads(out.get_text("summary.json"))
    assert summary["passed"] and summary["photos"] == len(test) and set(summary["differences"]) == {
        "accuracy", "balanced_accuracy", "mae"}
    report = out.get_text("report.md")
    assert "# Promotion gate: chall against champion champ" in report and "McNemar" in report
    html = out.get_text("report.html")
    assert html.count('src="data:image/png;base64,') == 2 and "PASSED" in html


def test_the_cli_exits_2_when_the_rule_refuses(models, cache_dir, capsys):
    args = ["model", "compare", "--store", models, "--champion", "champ", "--challenger", "chall", "--dataset",
            DATASET, "--cache-dir", str(cache_dir), "--bootstrap", "500"]
    assert cli.main(args + ["--mae-margin", "0", "--min-accuracy", "1.01"]) == ALERT_EXIT
    out = capsys.readouterr().out
    assert "refused by the min_accuracy rule: challenger accuracy" in out and "< 1.0100" in out
    assert cli.main(args + ["--mae-margin", "9", "--balanced-accuracy-margin", "1"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--champion", "champ", "--challenger", "three"],
     "cannot compare: champion champ counts [1, 2, 3, 4, 5], challenger three counts [1, 2, 3]"),
    (["--champion", "champ", "--challenger", "chall", "--split", "val"],
     f"cannot compare on the val split of {DATASET}: the champion champ was selected and calibrated on it; "
     "compare on test"),
    (["--champion", "champ", "--challenger", "chall", "--split", "train"],
     f"cannot compare on the train split of {DATASET}: the champion champ was trained on it; compare on test"),
    (["--champion", "champ", "--challenger", "other"],
     f"cannot compare on the test split of {DATASET}: {{test}} of its photos are in the train or val split of "
     "tiny-copy, which the challenger other was fitted on"),
])
def test_a_comparison_that_would_say_nothing_is_refused_in_one_line(models, cache_dir, capsys, args, message):
    code = cli.main(["model", "compare", "--store", models, "--dataset", DATASET, "--cache-dir", str(cache_dir),
                     *args])
    err = capsys.readouterr().err
    test = len(open_store(models).get_text(f"datasets/{DATASET}/test.jsonl").splitlines())
    assert code == 1 and err == f"bincount: error: {message.format(test=test)}\n"


def test_refusal_is_the_libraries_error_too(models):
    with pytest.raises(Refused, match="counts"):
        compare(CompareConfig(store=models, champion="three", challenger="chall", dataset=DATASET))
