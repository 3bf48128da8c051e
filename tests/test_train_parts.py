"""The trainer's parts on their own: model factory and freeze policies, weights loading (file and S3),
schedules, config checks, manifests, the image cache and the transforms."""

from __future__ import annotations

import io
import math
import re
import time
from datetime import datetime, timezone

import pytest
import torch
from PIL import Image

from bincount.config import TrainConfig, load_config
from bincount.data.dataset import BinImages, DataError, ImageCache, Item, load_split
from bincount.errors import ConfigError
from bincount.store import open_store
from bincount.model import zoo
from bincount.model.exported import Preprocessing
from bincount.model.preprocess import read_image
from bincount.train import freeze, losses, presets, report, sampling
from bincount.train.budget import Plan
from bincount.train.loop import make_optimizer, make_scheduler, metric_line, validate
from training_data import KATIB_METRIC


def test_unknown_architecture_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        zoo.build_model("resnet19", 5)
    for name in ("resnet18", "resnet50", "resnext50_32x4d", "resnext101_32x8d", "efficientnet_b0",
                 "convnext_tiny", "mobilenet_v3_large"):
        assert name in str(e.value)
    assert "squeezenet1_0" not in zoo.architectures()


@pytest.mark.parametrize("arch, head", [("resnet18", "fc"), ("efficientnet_b0", "classifier.1"),
                                        ("mobilenet_v3_large", "classifier.3"), ("convnext_tiny", "classifier.2")])
def test_new_five_class_head_replaces_the_last_linear(arch, head):
    model, weights_id = zoo.build_model(arch, 5, "none")
    assert weights_id == "none" and zoo.head_name(model) == head
    assert model.get_submodule(head).out_features == 5
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


def test_freeze_policies():
    model, _ = zoo.build_model("resnet18", 5, "none")
    freeze.apply_freeze(model, "backbone")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    freeze.train_mode(model)
    assert model.training and model.fc.training and not model.layer1.training and not model.bn1.training

    model, _ = zoo.build_model("resnet18", 5, "none")
    freeze.apply_freeze(model, "layer2")
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4", "fc"}

    with pytest.raises(ConfigError) as e:
        freeze.apply_freeze(model, "layer9")
    assert "layer9" in str(e.value) and "layer3" in str(e.value) and "fc" not in str(e.value).split("stage:")[1]


def test_weights_from_a_file_keep_the_backbone_and_reinitialize_a_foreign_head(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    imagenet = resnet18()                       # a 1000-class state dict, as torchvision's weights are
    path = tmp_path / "imagenet.pt"
    torch.save(imagenet.state_dict(), path)
    model, weights_id = zoo.build_model("resnet18", 5, str(path))
    assert weights_id.startswith("sha256-")
    assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert model.fc.out_features == 5

    torch.save({"model": model.state_dict()}, path)          # a checkpoint with the 5-class head: loaded whole
    again, _ = zoo.build_model("resnet18", 5, str(path))
    assert torch.equal(again.fc.weight, model.fc.weight)

    with pytest.raises(ConfigError, match="do not fit resnet50"):
        zoo.build_model("resnet50", 5, str(path))
    with pytest.raises(ConfigError, match="cannot read weights file"):
        zoo.build_model("resnet18", 5, str(tmp_path / "nothing.pt"))
    with pytest.raises(ConfigError, match="unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        zoo.build_model("resnet18", 5, "IMAGENET9K")


def test_weights_from_s3(s3_env):
    bucket = s3_env.new_bucket("weights")
    torch.manual_seed(1)
    model, _ = zoo.build_model("resnet18", 5, "none")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    open_store(f"s3://{bucket}").put("runs/a/model.pt", buf.getvalue())
    loaded, weights_id = zoo.build_model("resnet18", 5, f"s3://{bucket}/runs/a/model.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ConfigError, match="do not exist"):
        zoo.build_model("resnet18", 5, f"s3://{bucket}/runs/b/model.pt")


def _lrs(schedule: str, epochs=4, steps=10, warmup=1.0, total=0) -> list[float]:
    cfg = TrainConfig(store="s", dataset="d", run="r", lr=0.1, epochs=epochs, schedule=schedule, warmup_epochs=warmup,
                      steps=total)
    opt = make_optimizer(torch.nn.Linear(2, 2), cfg, "")
    plan = Plan.make(cfg.steps, cfg.epochs, steps, cfg.time_budget, 0.0)
    sched = make_scheduler(opt, cfg, plan)
    out = []
    for _ in range(plan.total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out + [opt.param_groups[0]["lr"]]        # after the last step


def test_schedules():
    cosine = _lrs("cosine")
    assert len(cosine) == 41
    assert cosine[:10] == pytest.approx([0.01 * (i + 1) for i in range(10)])       # linear warmup
    assert cosine[10] == pytest.approx(0.1) and 0 < cosine[-2] < 0.001 and cosine[-1] == 0.0
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    linear = _lrs("linear")
    assert linear[10:] == pytest.approx([0.1 * (30 - i) / 30 for i in range(31)])   # to zero on the last step
    assert _lrs("constant")[10:] == pytest.approx([0.1] * 31)
    onecycle = _lrs("onecycle")
    assert max(onecycle) == pytest.approx(0.1, rel=1e-3) and onecycle[0] < 0.01 and onecycle[-2] < 1e-4
    # `steps` ends the run and its decay mid-epoch; epochs stay a ceiling
    assert len(_lrs("linear", total=25)) == 26 and _lrs("linear", total=25)[-1] == 0.0
    assert len(_lrs("linear", total=500)) == 41
    # a warmup as long as the whole run (a one-epoch trial of the quickstart recipe) still schedules
    assert max(_lrs("onecycle", epochs=1, steps=3, warmup=1.0)) == pytest.approx(0.1, rel=1e-3)
    assert _lrs("onecycle", epochs=1, steps=2, warmup=1.0)[:2] == pytest.approx([0.05, 0.1])  # linear warmup


def test_weight_decay_skips_biases_and_norms_and_the_backbone_learns_at_its_scale():
    model, _ = zoo.build_model("resnet18", 5, "none")
    cfg = TrainConfig(store="s", dataset="d", run="r", weight_decay=0.05, lr=0.01, backbone_lr_scale=0.1)
    groups = make_optimizer(model, cfg, "fc.").param_groups
    head = [p for g in groups[:2] for p in g["params"]]
    assert {id(p) for p in head} == {id(model.fc.weight), id(model.fc.bias)}
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.01, 0.001, 0.001])
    for group in groups:
        decayed = group["weight_decay"] == 0.05
        assert decayed or group["weight_decay"] == 0.0
        assert all((p.ndim > 1) == decayed for p in group["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_config_checks_collect_every_problem(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("store: s\ndataset: d\nrun: r\nprecision: fp8\nloss: hinge\ntta: d4\nimage_size: 224\n"
                    "class_weights: [1, 2]\n")
    cfg = load_config(TrainConfig, path, {"optimizer": "lamb"})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    for part in ("precision 'fp8'", "optimizer 'lamb'", "loss 'hinge'", "tta 'd4'", "class_weights needs 5"):
        assert part in str(e.value)
    assert load_config(TrainConfig, None, {"store": "s", "dataset": "d", "run": "r",
                                           "class_weights": "1,1,2,1,1"}).class_weights == [1, 1, 2, 1, 1]
    with pytest.raises(ConfigError, match="run id"):
        validate(TrainConfig(store="s", dataset="d", run="../x"))


def test_metric_line_is_read_whole_by_katibs_regex_after_its_time():
    """Katib's collector parses a metric line's first word with Go's time.RFC3339Nano layout (zero time if that
    fails), and the regex must take no pair from it."""
    before = datetime.now(timezone.utc)
    line = metric_line({"epoch": 3, "train_loss": 1.21, "train_accuracy": 0.5, "val_loss": 1.3,
                        "val_accuracy": 0.41, "val_balanced_accuracy": 0.4, "val_mae": 0.7, "lr": 4e-05})
    stamp, pairs = line.split(" ", 1)
    assert pairs == ("epoch=3 train_loss=1.21 train_accuracy=0.5 val_loss=1.3 val_accuracy=0.41 "
                     "val_balanced_accuracy=0.4 val_mae=0.7 lr=4e-05")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
    assert before <= datetime.fromisoformat(stamp.replace("Z", "+00:00")) <= datetime.now(timezone.utc)
    assert [f"{name}={value}" for name, value, *_ in KATIB_METRIC.findall(line)] == pairs.split()


def _jpeg(size: tuple[int, int], colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_manifest_problems_are_named(tmp_path):
    store = open_store(str(tmp_path))
    store.put_text("datasets/d/train.jsonl", '{"key": "00221", "label": 2}\n{"key": "221", "label": 7}\n')
    with pytest.raises(DataError, match="line 2: label 7 of key '221'"):
        load_split(store, "d", "train", (1, 2, 3, 4, 5))
    store.put_text("datasets/d/train.jsonl", '{"key": "00221", "label": 2}\nnot json\n')
    with pytest.raises(DataError, match="not JSON lines"):
        load_split(store, "d", "train", (1, 2, 3, 4, 5))
    store.put_text("datasets/d/train.jsonl", '{"key": "00221", "label": 2}\n{"key": "221", "label": 3}\n')
    assert load_split(store, "d", "train", (1, 2, 3, 4, 5)) == [Item("00221", 2), Item("221", 3)]


def test_image_cache_keeps_the_models_input_squares_and_reports_bad_images(tmp_path):
    store = open_store(str(tmp_path / "store"))
    small, large = _jpeg((60, 50), (20, 200, 20)), _jpeg((400, 300))
    store.put("raw/bin-images/221.jpg", large)
    store.put("raw/bin-images/00221.jpg", small)
    cache = ImageCache(store, tmp_path / "cache", 32)
    assert cache.fill(["221", "00221"], 4) == 2 and cache.fill(["221", "00221"], 4) == 0
    images = BinImages([Item("221", 3), Item("00221", 1)], cache, (1, 2, 3, 4, 5))
    (x, y), (x2, y2) = images[0], images[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and (y, y2) == (2, 0)
    assert torch.equal(x, read_image(large, 32)) and torch.equal(x2, read_image(small, 32))  # one preprocessing
    assert abs(int(x[0, 16, 16]) - 200) < 8 and abs(int(x2[1, 16, 16]) - 200) < 8

    store.put("raw/bin-images/bad.jpg", large[:100])
    with pytest.raises(DataError) as e:
        cache.fill(["bad", "gone"], 4)
    assert "1 image(s) missing" in str(e.value) and "raw/bin-images/gone.jpg" in str(e.value)
    assert "raw/bin-images/bad.jpg" in str(e.value)


def test_train_transform_keeps_the_square_and_the_model_normalizes():
    image = torch.full((3, 48, 48), 128, dtype=torch.uint8)
    for augment in presets.AUGMENTS:
        assert presets.train_transform(augment)(image).shape == (3, 48, 48)
    preprocessing = Preprocessing(48, zoo.IMAGENET_MEAN, zoo.IMAGENET_STD)
    x = preprocessing.normalize(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), torch.device("cpu"),
                                channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    expected = [(1 - m) / s for m, s in zip(zoo.IMAGENET_MEAN, zoo.IMAGENET_STD)]
    assert x[0, :, 0, 0].tolist() == pytest.approx(expected)


def test_counting_augment_only_flips_turns_and_recolours():
    """Every output shows the same red items, in one of the 8 flips/quarter turns: nothing cut, blackened or moved."""
    image = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    items = torch.zeros(32, 32, dtype=torch.bool)
    items[2:6, 3:12] = items[20:29, 25:28] = items[14, 0] = True
    image[1:, items] = 0
    variants = [torch.rot90(m, k) for m in (items, items.flip(1)) for k in range(4)]
    torch.manual_seed(0)
    seen, colours = set(), set()
    transform = presets.train_transform("counting")
    for _ in range(64):
        out = transform(image)
        mask = out.float().mean(0) < 128
        matches = [i for i, v in enumerate(variants) if torch.equal(mask, v)]
        assert len(matches) == 1
        seen.add(matches[0])
        colours.add(int(out[:, mask].float().mean(1).argmax()))
    assert seen == set(range(8)) and colours == {0, 1, 2}


def test_report_flags_plateau_and_overfitting():
    def epoch(n, train_loss, val_loss):
        return {"epoch": n, "train_loss": train_loss, "val_loss": val_loss}

    flat = [epoch(1, 1.0, 1.0), epoch(2, 0.999, 0.9), epoch(3, 0.998, 0.8), epoch(4, 0.997, 0.7)]
    assert report.flags(flat) == ["loss plateau: train loss changed by less than 1% over epochs 1 to 4"]
    overfit = [epoch(1, 1.0, 1.0), epoch(2, 0.8, 1.1), epoch(3, 0.6, 1.2)]
    assert report.flags(overfit) == ["overfitting: validation loss rose while training loss fell over epochs 1 to 3"]
    assert report.flags(overfit[:2]) == []


def test_epoch_timer_counts_outlier_steps():
    timer = report.EpochTimer()
    for step in [0.001] * 30 + [0.05]:
        timer.batch_ready()
        time.sleep(step)
        timer.step_done()
    stats = timer.stats()
    assert stats["step_outliers"] == 1 and stats["step_time_max_s"] >= 0.05
    assert 0 <= stats["data_wait_share"] < 0.5


def test_the_same_bin_sampler_shuffles_whole_bins_and_shares_them_like_distributed_sampler():
    bins = sampling.bin_ids([Item("a", 1, "x"), Item("b", 2), Item("c", 3, "x"), Item("d", 1, "y"),
                             Item("e", 2, "z"), Item("f", 4, "y"), Item("g", 5), Item("h", 3, "x")])
    assert bins == [0, -1, 0, 1, -1, 1, -1, 0]      # "z" has one photo here: a photo alone
    sampler = sampling.SameBinSampler(bins, num_replicas=1, rank=0, seed=7)
    orders = []
    for epoch in (1, 2, 1):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[2] != orders[1] and sorted(orders[0]) == list(range(8))
    for order in orders:
        for members in ({0, 2, 7}, {3, 5}):
            places = sorted(order.index(i) for i in members)
            assert places[-1] - places[0] == len(members) - 1, (order, members)
    shares = [list(sampling.SameBinSampler(bins, num_replicas=3, rank=r, seed=7)) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3] and set().union(*shares) == set(range(8))


def test_same_bin_ranking_wants_the_photo_with_more_items_to_expect_more():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    sure = torch.full((5,), -9.0)
    two, four = sure.clone(), sure.clone()
    two[1], four[3] = 9.0, 9.0
    y, bins = torch.tensor([1, 3]), torch.tensor([0, 0])
    right = losses.same_bin_ranking(torch.stack([two, four]), y, bins, values)
    wrong = losses.same_bin_ranking(torch.stack([four, two]), y, bins, values)
    assert right < 0.2 < math.log(2) < 2.0 < wrong
    # other bins, photos alone and equal counts are not compared: only the right pair counts
    logits = torch.stack([two, four, four, two, four, two, two, two])
    y8 = torch.tensor([1, 3, 1, 3, 1, 3, 1, 1])
    assert torch.isclose(losses.same_bin_ranking(logits, y8, torch.tensor([0, 0, 1, 2, -1, -1, 3, 3]), values), right)
    flat = torch.zeros(2, 5, requires_grad=True)
    losses.same_bin_ranking(flat, y, bins, values).backward()
    expected_after = (flat.detach() - flat.grad).softmax(1) @ values
    assert expected_after[1] > 3.0 > expected_after[0]
    none = losses.same_bin_ranking(flat, y, torch.tensor([0, 1]), values)
    assert none.item() == 0 and none.requires_grad


def test_corn_head_gives_rank_consistent_counts_and_its_loss_is_corns_binary_tasks():
    torch.manual_seed(0)
    head = zoo.CornHead(8, 5)
    x = torch.randn(64, 8)
    with torch.no_grad():
        log_p = head(x)
    assert head.out_features == 4 and log_p.shape == (64, 5)
    assert log_p.exp().sum(1).tolist() == pytest.approx([1.0] * 64)
    raw = torch.nn.functional.linear(x, head.weight, head.bias)
    above = (1 - log_p.exp().cumsum(1))[:, :-1]                       # P(count > k), k = 0..3
    assert torch.allclose(above, torch.sigmoid(raw).cumprod(1), atol=1e-6)
    assert bool((above[:, 1:] <= above[:, :-1] + 1e-7).all())         # rank-consistent, whatever the weights
    y = torch.randint(5, (64,))
    total, seen = 0.0, 0
    for k in range(4):
        chosen = y >= k
        total += torch.nn.functional.binary_cross_entropy_with_logits(raw[chosen, k], (y[chosen] > k).float(),
                                                                      reduction="sum")
        seen += int(chosen.sum())
    classes = (1, 2, 3, 4, 5)
    assert losses.CountLoss("corn", classes)(log_p, y).item() == pytest.approx(total.item() / seen, rel=1e-5)
    # class weights weigh every task a sample takes part in; a softmax head's log-probabilities work as well
    weighted = losses.CountLoss("corn", classes, weights=torch.tensor([1.0, 1, 1, 1, 3]))(log_p, y)
    assert weighted.item() != pytest.approx(total.item() / seen)
    assert torch.isfinite(losses.CountLoss("corn", classes)(torch.randn(8, 5) * 50, y[:8]))
