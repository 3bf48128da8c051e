"""Recipes: packaged training configs by name or a YAML file, applied under every other source of settings
(defaults < recipe < --config file < --set < flags), and carried by name to torchrun and PyTorchJobs."""

from __future__ import annotations

import pytest

from bincount.backends import train_args
from bincount.config import TrainConfig, load_train_config, recipe_settings, recipes
from bincount.errors import ConfigError
from bincount.train import entry
from bincount.train.loop import validate

PLACE = ["--store", "/data", "--dataset", "abid", "--run", "r"]


def parsed(*args: str) -> TrainConfig:
    return entry.config(entry.parser().parse_args(args))


def test_packaged_recipes_are_valid_trainer_configs():
    assert {"quickstart", "abid"} <= set(recipes())
    for name in recipes():
        cfg = load_train_config(None, {"store": "s", "dataset": "d", "run": "r", "recipe": name})
        validate(cfg)
        assert cfg.recipe == name and all(getattr(cfg, k) == v or list(getattr(cfg, k)) == v
                                          for k, v in recipe_settings(name).items())


def test_override_order_defaults_recipe_file_set_flags(tmp_path):
    abid = recipe_settings("abid")
    cfg = parsed(*PLACE, "--recipe", "abid")
    assert (cfg.arch, cfg.weights, cfg.image_size) == (abid["arch"], abid["weights"], abid["image_size"])
    assert cfg.momentum == TrainConfig.momentum                              # untouched by the recipe: default

    config = tmp_path / "train.yaml"
    config.write_text("recipe: abid\nimage_size: 200\nlr: 0.5\nepochs: 3\n")
    cfg = parsed(*PLACE, "--config", str(config), "--set", "lr=0.25", "--set", "epochs=4", "--epochs", "5")
    assert cfg.recipe == "abid" and cfg.arch == abid["arch"]                 # the file names the recipe
    assert (cfg.image_size, cfg.lr, cfg.epochs) == (200, 0.25, 5)            # file < --set < flag

    cfg = parsed(*PLACE, "--config", str(config), "--recipe", "quickstart")  # the flag's recipe wins
    assert cfg.arch == "resnet18" and cfg.image_size == 200


def test_a_recipe_file_and_its_errors(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("arch: efficientnet_lite1\nepochs: 2\n")
    assert parsed(*PLACE, "--recipe", str(mine)).arch == "efficientnet_lite1"
    with pytest.raises(ConfigError, match="unknown recipe 'abdi'; packaged: .*abid"):
        parsed(*PLACE, "--recipe", "abdi")
    mine.write_text("arhc: resnet18\n")
    with pytest.raises(ConfigError, match=r"recipe file .*mine.yaml: unknown key\(s\) arhc"):
        parsed(*PLACE, "--recipe", str(mine))
    mine.write_text("store: s3://elsewhere\n")
    with pytest.raises(ConfigError, match="a recipe says how to train, not what or where; remove store"):
        parsed(*PLACE, "--recipe", str(mine))
    with pytest.raises(ConfigError, match="does not exist"):
        parsed(*PLACE, "--recipe", str(tmp_path / "gone.yaml"))


def test_backends_carry_a_packaged_recipe_by_name_and_only_what_differs_from_it(tmp_path):
    cfg = parsed(*PLACE, "--recipe", "abid", "--lr", "0.123", "--set", f"momentum={TrainConfig.momentum}")
    args = train_args(cfg)
    assert args[6:8] == ["--recipe", "abid"] and "--set" in args and "lr=0.123" in args
    assert len(args) == 10                                                  # nothing else differs from the recipe
    assert parsed(*args) == cfg

    # a setting put back to the plain default, away from the recipe's value, must travel too
    back = parsed(*PLACE, "--recipe", "abid", "--arch", TrainConfig.arch)
    assert parsed(*train_args(back)) == back

    mine = tmp_path / "mine.yaml"
    mine.write_text("arch: efficientnet_lite1\nepochs: 2\n")
    from_file = parsed(*PLACE, "--recipe", str(mine))
    args = train_args(from_file)
    assert "--recipe" not in args and "arch=efficientnet_lite1" in args and "epochs=2" in args
    again = parsed(*args)
    assert again.arch == "efficientnet_lite1" and again.epochs == 2 and again.recipe == ""
