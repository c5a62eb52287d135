"""Every implementation of the grouped convolution equals the native one; the chooser caches."""

import json

import pytest
import torch

from towerspace import TowerConv2d
from towerspace.impls import CACHE_VERSION, IMPLS, Chooser, candidates, signature
from towerspace.towers import divisors


def _pair(c_in, c_out, towers, order, impl, stride):
    torch.manual_seed(towers)
    ref = TowerConv2d(c_in, c_out, towers=towers, order=order, stride=stride, bias=True).double()
    other = TowerConv2d(c_in, c_out, towers=towers, order=order, stride=stride, bias=True,
                        impl=impl).double()  # fmt: skip
    torch.nn.init.normal_(ref.bias)
    other.load_state_dict(ref.state_dict())
    return ref, other


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("order", ["spatial_first", "pointwise_first"])
@pytest.mark.parametrize("stride", [1, 2])
def test_outputs_and_gradients_match_native_at_every_tower_count(impl, order, stride):
    for towers in divisors(12):
        ref, other = _pair(12, 12, towers, order, impl, stride)
        x = torch.randn(2, 12, 9, 9, dtype=torch.float64, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y, y2 = ref(x), other(x2)
        torch.testing.assert_close(y2, y, rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(y)
        y.backward(grad)
        y2.backward(grad)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-10, atol=1e-10)
        for (name, p), p2 in zip(ref.named_parameters(), other.parameters(), strict=True):
            torch.testing.assert_close(p2.grad, p.grad, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_float32_channels_last_inputs(impl):
    ref, other = _pair(16, 16, 4, "spatial_first", impl, 1)
    ref, other = ref.float(), other.float()
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(other(x), ref(x), rtol=1e-4, atol=1e-5)


def test_candidates_skip_what_cannot_win():
    assert candidates(256, 1) == ["native", "channels_last"]
    regroups = ["regroup2", "regroup4", "regroup8"]
    assert candidates(256, 4) == ["native", "channels_last", "dense", "per_tower", "unfold_bmm",
                                  "regroup2"]  # fmt: skip
    assert candidates(256, 128) == ["native", "channels_last", "depthwise_sum", "unfold_bmm",
                                    *regroups]  # fmt: skip
    assert candidates(256, 256) == ["native", "channels_last", "unfold_bmm", *regroups]


def test_auto_measures_once_per_signature_and_reuses_the_choice(tmp_path):
    chooser = Chooser(tmp_path / "choices.json", repeats=1)
    block, x = TowerConv2d(16, 16, towers=4, impl="auto"), torch.randn(2, 16, 8, 8)
    first = chooser.choose(block, x, training=True)
    assert first in candidates(16, 4) and chooser.measured == 1
    assert chooser.choose(block, x, training=True) == first and chooser.measured == 1
    chooser.choose(block, x, training=False)  # inference is another signature
    assert chooser.measured == 2
    assert all(p.grad is None for p in block.parameters())  # timing used copies
    saved = json.loads((tmp_path / "choices.json").read_text())
    key = signature(block, x, True)
    assert key == "cpu|float32|nchw|train|16x8x8|16>16|k3|s1|d1|t4|spatial_first|none"
    assert saved == {"version": CACHE_VERSION, "choices": {key: first, **saved["choices"]}}
    again = Chooser(tmp_path / "choices.json")  # another process reads the file: no timing
    assert again.choose(block, x, training=True) == first and again.measured == 0


def test_signature_leaves_out_the_batch_but_not_what_the_choice_depends_on():
    block = TowerConv2d(16, 16, towers=4)
    x = torch.randn(8, 16, 8, 8)
    key = signature(block, x, True)
    assert signature(block, x[:3], True) == key
    others = [signature(block, x[:, :, :4, :4], True), signature(block, x, False),
              signature(block, x.double(), True),
              signature(block, x.contiguous(memory_format=torch.channels_last), True),
              signature(TowerConv2d(16, 16, towers=8), x, True),
              signature(TowerConv2d(16, 16, stride=2, towers=4), x, True),
              signature(TowerConv2d(16, 16, dilation=2, towers=4), x, True)]  # fmt: skip
    assert len({key, *others}) == 1 + len(others)


def test_auto_times_once_across_batch_sizes_and_matches_native(monkeypatch, tmp_path):
    from towerspace import impls

    chooser = Chooser(tmp_path / "c.json", repeats=1, min_time=0.001)
    monkeypatch.setattr(impls, "_DEFAULT", [chooser])
    ref, auto = _pair(16, 16, 4, "spatial_first", "auto", 1)
    for batch in (8, 3, 8):  # a full batch, the epoch's last partial batch, the next epoch
        x = torch.randn(batch, 16, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(auto(x), ref(x), rtol=1e-10, atol=1e-10)
        assert chooser.measured == 1 and len(chooser.choices) == 1


def test_cache_file_of_another_version_is_ignored_and_replaced(tmp_path):
    path = tmp_path / "c.json"
    block, x = TowerConv2d(16, 16, towers=4), torch.randn(2, 16, 8, 8)
    old_key = "cpu|float32|nchw|train|2x16x8x8|16>16|k3|s1|d1|t4|spatial_first|none"
    path.write_text(json.dumps({old_key: "dense"}))  # version 1: flat, batch in the key
    chooser = Chooser(path, repeats=1, min_time=0.001)
    assert chooser.choices == {}
    choice = chooser.choose(block, x, training=True)
    assert chooser.measured == 1
    saved = json.loads(path.read_text())
    assert saved == {"version": 2, "choices": {signature(block, x, True): choice}}
    (tmp_path / "other.json").write_text(json.dumps({"version": 3, "choices": {"a": "b"}}))
    assert Chooser(tmp_path / "other.json").choices == {}


def test_auto_block_trains_like_native(monkeypatch, tmp_path):
    from towerspace import impls

    monkeypatch.setattr(impls, "_DEFAULT", [Chooser(tmp_path / "c.json", repeats=1)])
    ref, auto = _pair(8, 8, 2, "spatial_first", "auto", 1)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(auto(x), ref(x))
    assert impls.default_chooser().measured == 1


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError) as err:
        TowerConv2d(8, 8, impl="fast")
    assert str(err.value) == (
        "impl='fast' is not one of: native, channels_last, dense, per_tower, depthwise_sum, "
        "unfold_bmm, regroup2, regroup4, regroup8, auto"
    )


def test_xception_with_auto_impl_matches_native(monkeypatch, tmp_path):
    from towerspace import impls
    from towerspace.models import xception

    monkeypatch.setattr(impls, "_DEFAULT", [Chooser(tmp_path / "c.json", repeats=1)])
    kw = {"width": 0.125, "middle_blocks": 1, "stem": "small", "num_classes": 3, "towers": 4}
    torch.manual_seed(0)
    native = xception(**kw).double()
    auto = xception(impl="auto", **kw).double()
    auto.load_state_dict(native.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(auto(x), native(x))
    sites = {m.impl for m in auto.modules() if isinstance(m, TowerConv2d)}
    assert sites == {"auto"} and impls.default_chooser().measured >= 1


def test_trainer_with_auto_impl_records_one_choice_per_layer_shape(monkeypatch, tmp_path):
    from towerspace import impls
    from towerspace.data import DataConfig, load
    from towerspace.models import xception
    from towerspace.train import TrainConfig, Trainer

    chooser = Chooser(tmp_path / "c.json", repeats=1, min_time=0.001)
    monkeypatch.setattr(impls, "_DEFAULT", [chooser])
    torch.manual_seed(0)
    model = xception(width=0.125, middle_blocks=1, stem="small", num_classes=10, in_chans=1,
                     input_size=16, impl="auto")  # fmt: skip
    shapes: set[tuple] = set()

    def record(layer, inputs, _output):
        x = inputs[0]
        shapes.add((layer.training, tuple(x.shape[1:]), layer.out_channels, layer.stride,
                    layer.towers, x.is_contiguous(memory_format=torch.channels_last)))  # fmt: skip

    for layer in model.modules():
        if isinstance(layer, TowerConv2d):
            layer.register_forward_hook(record)
    data = load(DataConfig(name="digits", image_size=16))
    # eval batches of 100 leave a partial last batch: several batch sizes, one choice per shape
    cfg = TrainConfig(epochs=1, max_steps=2, batch_size=32, eval_batch_size=100, device="cpu")
    trainer = Trainer(model, data, cfg)
    metrics = next(trainer.epochs())
    assert trainer.step == 2
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("train_loss", "val_loss"))
    assert len(data.val) % 100 != 0
    modes = {training for training, *_ in shapes}
    assert modes == {True, False}
    assert chooser.measured == len(chooser.choices) == len(shapes)
    assert set(chooser.choices.values()) <= set(IMPLS)


def test_auto_on_meta_tensors_times_nothing():
    from towerspace.block import TowerConv2d
    from towerspace.impls import default_chooser

    before = default_chooser().measured
    with torch.device("meta"):
        block = TowerConv2d(16, 16, towers=4, impl="auto")
        out = block(torch.empty(2, 16, 8, 8))
    assert out.shape == (2, 16, 8, 8) and out.is_meta
    assert default_chooser().measured == before  # shapes only: a cost estimate times nothing
