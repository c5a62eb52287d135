"""Keras-exact Xception: the "same" padding of the strided max-pools, checked by hand and against
Keras Applications' own Xception (Keras 3 on its torch backend), layer by layer."""

import os

import numpy as np
import pytest
import torch
from torch import nn

from towerspace.errors import ConfigError
from towerspace.models import xception
from towerspace.models.pretrained import from_keras_xception
from towerspace.models.xception import KerasMaxPool2d, SeparableBlock

SIZE = 100  # pools at 47, 24, 12 and 6 px: the last three are even, padded bottom/right only


def test_keras_pooling_equals_a_hand_computed_tensor():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # 4 px by 2 → 2 px: one padded row and column, at the bottom and right only, so the windows
    # are rows/columns {0, 1, 2} and {2, 3}
    assert KerasMaxPool2d()(x).tolist() == [[[[10.0, 11.0], [14.0, 15.0]]]]
    # PyTorch's padding=1 pads both sides: windows {-1, 0, 1} and {1, 2, 3}
    assert nn.MaxPool2d(3, 2, padding=1)(x).tolist() == [[[[5.0, 7.0], [13.0, 15.0]]]]


def test_keras_pooling_pads_odd_and_negative_inputs_as_torch_does():
    x = -torch.rand(2, 3, 7, 5) - 1  # all negative: a zero pad would show as a 0 maximum
    torch_pool = nn.MaxPool2d(3, 2, padding=1)
    assert torch.equal(KerasMaxPool2d()(x), torch_pool(x))  # odd sides: both pad 1 each side
    even = -torch.rand(1, 1, 6, 8) - 1
    assert KerasMaxPool2d()(even).shape == torch_pool(even).shape == (1, 1, 3, 4)
    assert KerasMaxPool2d()(even).max() < 0


def test_pool_padding_is_checked_and_changes_no_cost():
    keras = xception(pool_padding="keras", middle_blocks=1)
    plain = xception(middle_blocks=1)
    assert keras.complexity(299) == plain.complexity(299)
    assert sum(isinstance(m, KerasMaxPool2d) for m in keras.modules()) == 4
    with pytest.raises(ConfigError, match=r"pool_padding='same' is not one of: torch, keras"):
        xception(pool_padding="same")


def _keras_xception():
    os.environ["KERAS_BACKEND"] = "torch"
    keras = pytest.importorskip("keras")  # a dev dependency: present wherever tests run
    assert keras.backend.backend() == "torch", "keras was imported before with another backend"
    keras.utils.set_random_seed(0)
    model = keras.applications.Xception(weights=None, input_shape=(SIZE, SIZE, 3), classes=10)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # BatchNorm statistics away from 0 and 1, so they are checked
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma, beta, rng.normal(0, 0.1, mean.shape).astype("float32"),
                               rng.uniform(0.5, 1.5, var.shape).astype("float32")])  # fmt: skip
    return keras, model


def _block_outputs(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out))
             for m in model.modules() if isinstance(m, SeparableBlock)]  # fmt: skip
    with torch.no_grad():
        logits = model(x)
    for hook in hooks:
        hook.remove()
    return outputs, logits


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras' np.array(tensor) calls
def test_depthwise_xception_with_keras_padding_equals_keras_at_every_block():
    keras, reference = _keras_xception()
    blocks = [layer.output for layer in reference.layers if type(layer).__name__ == "Add"]
    blocks.append(reference.get_layer("block14_sepconv2_act").output)
    probe = keras.Model(reference.inputs, [*blocks, reference.output])
    image = np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype("float32")
    *expected, probabilities = map(torch.as_tensor, probe.predict(image, verbose=0))
    expected = [e.permute(0, 3, 1, 2) for e in expected]  # Keras: channels last
    assert len(expected) == 13  # blocks 2 to 13 end in an addition; block 14 in a ReLU

    state = from_keras_xception(reference)
    x = torch.as_tensor(image).permute(0, 3, 1, 2)
    for padding in ("keras", "torch"):
        model = xception(num_classes=10, pool_padding=padding).eval()
        model.load_state_dict(state)
        outputs, logits = _block_outputs(model, x)
        pairs = zip(outputs, expected, strict=True)
        errors = [float((o - e).abs().max() / e.abs().max()) for o, e in pairs]
        if padding == "keras":  # equal to float rounding at every block, and at the end
            assert max(errors) < 1e-5, errors
            torch.testing.assert_close(logits.softmax(1), probabilities, atol=1e-6, rtol=1e-5)
        else:  # equal up to the first even-sized pool (block 3's, at 24 px), then not
            # (about 1e-3 of each block's largest value here, on Keras' random weights)
            assert errors[0] < 1e-5 and min(errors[1:12]) > 5e-4, errors
