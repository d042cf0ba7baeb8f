"""Tests of sleeplib.models: shapes, published sizes, initialisation, state carrying, gradients."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import sleeplib.models

from sleeplib.models import (
    MODELS,
    AttnSleep,
    AttnSleepConformer,
    AttnSleepMSMP,
    DeepFeatureNet,
    DeepSleepNet,
    SleepEEGNet,
    build_model,
)
from sleeplib.models.attnsleep_conformer import sinusoidal_positions
from sleeplib.models.attnsleep_msmp import MultiPeriodBlock
from sleeplib.models.blocks import CausalConv1d, StdLayerNorm, same_padding
from sleeplib.models.deepsleepnet import DeepFeatureEncoder

ATTNSLEEP_PARAMS = 522_805
UNUSED_ORIGINAL_PARAMS = 2 * (30 * 30 * 7 + 30) + 2 * 2 * 80  # per layer: one causal conv, one norm


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are small; on a shared 2-core machine one intra-op thread is many times faster
    # than two competing with other processes.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def deepsleepnet() -> DeepSleepNet:
    torch.manual_seed(1)
    return DeepSleepNet()


@pytest.fixture(scope="module")
def sleepeegnet() -> SleepEEGNet:
    torch.manual_seed(2)
    return SleepEEGNet()


# --------------------------------------------------------------------------------------- registry

def test_registry_builds_every_model_and_rejects_unknown_names():
    assert set(MODELS) == {"attnsleep", "attnsleep_conformer", "attnsleep_msmp",
                           "deepfeaturenet", "deepsleepnet", "sleepeegnet"}
    assert isinstance(build_model("AttnSleep", n_outputs=3), AttnSleep)
    with pytest.raises(KeyError, match="unknown model"):
        build_model("no_such_model")


def test_models_package_does_not_import_mne():
    # Static check of every module's imports (a sys.modules check would depend on test order).
    package_dir = Path(sleeplib.models.__file__).parent
    for source in package_dir.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(name.split(".")[0] == "mne" for name in names), source.name


# ---------------------------------------------------------------------------------- epoch models

EPOCH_MODELS = {
    "attnsleep": lambda: AttnSleep(),
    "conformer_channels": lambda: AttnSleepConformer(sequence_axis="channels"),
    "conformer_time": lambda: AttnSleepConformer(sequence_axis="time"),
    "msmp": lambda: AttnSleepMSMP(),
    "msmp_fixed_periods": lambda: AttnSleepMSMP(fixed_periods=(2, 5, 10)),
    "deepfeaturenet": lambda: DeepFeatureNet(),
}
FEATURE_SIZES = {"attnsleep": 2400, "conformer_channels": 2400, "conformer_time": 2400,
                 "msmp": 3000, "msmp_fixed_periods": 3000, "deepfeaturenet": 3072}


@pytest.mark.parametrize("name", list(EPOCH_MODELS))
@pytest.mark.parametrize("batch", [2, 4])
def test_epoch_model_shapes(name, batch):
    model = EPOCH_MODELS[name]()
    x = torch.randn(batch, 1, 3000)
    assert model(x).shape == (batch, 5)
    assert model(x[:, 0]).shape == (batch, 5)  # (B, T) is one channel
    assert model(x, return_feats=True).shape == (batch, FEATURE_SIZES[name])


@pytest.mark.parametrize("name", list(EPOCH_MODELS))
def test_epoch_model_gradients_flow(name):
    model = EPOCH_MODELS[name]()
    logits = model(torch.randn(3, 1, 3000))
    nn.functional.cross_entropy(logits, torch.tensor([0, 2, 4])).backward()
    for param_name, param in model.named_parameters():
        if "unused" in param_name:
            assert param.grad is None, param_name  # the original never uses these
            continue
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


def test_multichannel_input():
    model = AttnSleep(n_chans=2, n_outputs=4)
    assert model(torch.randn(2, 2, 3000)).shape == (2, 4)


# ---------------------------------------------------------------------------------- AttnSleep

def test_attnsleep_has_published_parameter_count_and_tce_input():
    model = AttnSleep()
    assert n_params(model) == ATTNSLEEP_PARAMS
    assert (model.n_tokens, model.d_model) == (30, 80)
    assert model.forward_features(torch.randn(2, 1, 3000)).shape == (2, 30, 80)
    assert n_params(AttnSleep(keep_unused_params=False)) == ATTNSLEEP_PARAMS - UNUSED_ORIGINAL_PARAMS


def test_attnsleep_shhs_variant():
    model = AttnSleep(sfreq=125.0, n_times=3750)
    assert model.d_model == 100
    assert model.feature_extractor.large_kernel_branch[5].kernel_size == (6,)
    assert model.forward_features(torch.randn(2, 1, 3750)).shape == (2, 30, 100)
    assert model(torch.randn(2, 1, 3750)).shape == (2, 5)
    assert model(torch.randn(2, 1, 3750), return_feats=True).shape == (2, 3000)
    with pytest.raises(ValueError, match="divisible"):
        AttnSleep(sfreq=125.0, n_times=3750, second_branch_kernel=7)  # 99 long


def test_attnsleep_initialisation_matches_weights_init_normal():
    model = AttnSleep()
    conv = torch.cat([m.weight.flatten() for m in model.modules() if type(m) is nn.Conv1d])
    assert abs(conv.mean().item()) < 1e-3
    assert conv.std().item() == pytest.approx(0.02, rel=0.02)
    bn_weight = torch.cat([m.weight for m in model.modules() if isinstance(m, nn.BatchNorm1d)])
    bn_bias = torch.cat([m.bias for m in model.modules() if isinstance(m, nn.BatchNorm1d)])
    assert bn_weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn_weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.all(bn_bias == 0)
    # As in the original (exact type test), causal convolutions keep PyTorch's default init:
    # kaiming-uniform with bound 1/sqrt(30*7), std ~0.04.
    causal = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, CausalConv1d)])
    assert causal.std().item() == pytest.approx((1 / (30 * 7) ** 0.5) / 3 ** 0.5, rel=0.05)


def test_causal_conv_equals_symmetric_padding_then_slicing():
    conv = CausalConv1d(3, 4, kernel_size=7)
    x = torch.randn(2, 3, 20)
    reference = nn.functional.conv1d(x, conv.weight, conv.bias, padding=6)[:, :, :-6]
    torch.testing.assert_close(conv(x), reference)
    # causality: changing the future leaves the past unchanged
    x_future = x.clone()
    x_future[..., 10:] += 1.0
    torch.testing.assert_close(conv(x_future)[..., :10], conv(x)[..., :10])


def test_std_layer_norm_uses_unbiased_std_plus_eps():
    norm = StdLayerNorm(5, eps=1e-6)
    x = torch.randn(3, 5)
    expected = (x - x.mean(-1, keepdim=True)) / (x.std(-1, unbiased=True, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)


def test_attnsleep_forward_is_deterministic_in_eval_mode():
    model = AttnSleep().eval()
    x = torch.randn(2, 1, 3000)
    torch.testing.assert_close(model(x), model(x))


def test_attnsleep_runs_under_vmap_over_stacked_fold_parameters():
    # The training engine may train several folds at once with functional_call + vmap.
    from torch.func import functional_call, stack_module_state, vmap

    folds = [AttnSleep().eval() for _ in range(3)]
    params, buffers = stack_module_state(folds)
    template = AttnSleep().eval().to("meta")
    x = torch.randn(3, 2, 1, 3000)
    batched = vmap(lambda p, b, xb: functional_call(template, (p, b), (xb,)))(params, buffers, x)
    looped = torch.stack([fold(x[i]) for i, fold in enumerate(folds)])
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- variants

@pytest.mark.parametrize("model_factory", [
    lambda: AttnSleepConformer(sequence_axis="channels"),
    lambda: AttnSleepConformer(sequence_axis="time"),
    lambda: AttnSleepMSMP(),
])
def test_variants_are_within_25_percent_of_attnsleep_size(model_factory):
    assert abs(n_params(model_factory()) / ATTNSLEEP_PARAMS - 1) <= 0.25


def test_conformer_replaces_only_the_encoder_layers():
    variant, base = AttnSleepConformer(), AttnSleep()
    assert type(variant.tce.layers[0]).__name__ == "ConformerBlock"
    for part in ("feature_extractor", "afr", "head"):
        assert n_params(getattr(variant, part)) == n_params(getattr(base, part))


def test_sinusoidal_positions():
    table = sinusoidal_positions(30, 7)
    assert table.shape == (30, 7)
    torch.testing.assert_close(table[0, 0::2], torch.zeros(4))
    torch.testing.assert_close(table[0, 1::2], torch.ones(3))


def test_multi_period_block_finds_the_dominant_period():
    block = MultiPeriodBlock(n_channels=4, n_hidden=8, top_k=2)
    t = torch.arange(100, dtype=torch.float32)
    x = torch.sin(2 * torch.pi * t / 10).expand(3, 4, 100) + 0.01 * torch.randn(3, 4, 100)
    periods, amplitudes = block.select_periods(x)
    assert periods[0] == 10
    assert amplitudes.shape == (3, 2)
    assert block(x).shape == x.shape
    fixed = MultiPeriodBlock(n_channels=4, fixed_periods=(4, 25))
    assert fixed.select_periods(x)[0] == [4, 25]


def test_msmp_replaces_only_the_feature_extractor():
    variant, base = AttnSleepMSMP(), AttnSleep()
    assert variant.d_model == 100 and variant.n_tokens == 30
    assert n_params(variant.afr) == n_params(base.afr)
    assert type(variant.tce.layers[0]) is type(base.tce.layers[0])


# ---------------------------------------------------------------------------------- DeepSleepNet

def test_tf_same_padding_lengths():
    assert same_padding(3000, 50, 6) == (22, 22)  # ceil(3000/6) = 500 outputs: 499*6+50-3000 = 44
    encoder = DeepFeatureEncoder()
    assert encoder.n_features == 128 * 16 + 128 * 8 == 3072
    assert encoder.small_filter_cnn(torch.randn(1, 1, 3000)).shape == (1, 128, 16)
    assert encoder.large_filter_cnn(torch.randn(1, 1, 3000)).shape == (1, 128, 8)


def test_deepfeaturenet_first_conv_is_the_l2_penalised_layer():
    model = DeepFeatureNet()
    (weight,) = model.first_conv_parameters()
    assert weight.shape == (64, 1, 50)
    assert weight is model.encoder.small_filter_cnn[0][0].weight


def test_deepsleepnet_shapes_and_state(deepsleepnet):
    logits, state = deepsleepnet(torch.randn(2, 3, 1, 3000))
    assert logits.shape == (2, 3, 5)
    assert len(state) == 2  # forward and backward directions
    for h, c in state:
        assert h.shape == c.shape == (2, 2, 512)
    feats, _ = deepsleepnet(torch.randn(2, 3, 3000), return_feats=True)  # (B, L, T) accepted
    assert feats.shape == (2, 3, 1024)


def test_deepsleepnet_from_feature_net_copies_the_cnn(deepsleepnet):
    feature_net = DeepFeatureNet()
    deepsleepnet.load_feature_net(feature_net)
    for (name, a), b in zip(deepsleepnet.feature_encoder.state_dict().items(),
                            feature_net.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    n_cnn = len(deepsleepnet.feature_net_parameters())
    assert n_cnn + len(deepsleepnet.sequence_parameters()) == len(list(deepsleepnet.parameters()))
    built = DeepSleepNet.from_feature_net(feature_net, lstm_hidden=16)
    assert torch.equal(built.first_conv_parameters()[0], feature_net.first_conv_parameters()[0])


def test_deepsleepnet_state_carry_equals_whole_night_for_the_forward_direction():
    model = DeepSleepNet(bidirectional=False, lstm_hidden=32).eval()
    night = torch.randn(1, 8, 1, 3000)
    with torch.no_grad():
        whole, whole_state = model(night)
        first, state = model(night[:, :5])
        second, halves_state = model(night[:, 5:], state)
        fresh, _ = model(night[:, 5:])  # state=None resets
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(halves_state[0][0], whole_state[0][0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fresh, second, atol=1e-4)


def test_deepsleepnet_bidirectional_carries_the_forward_state(deepsleepnet):
    deepsleepnet.eval()
    night = torch.randn(1, 6, 1, 3000)
    with torch.no_grad():
        _, whole_state = deepsleepnet(night)
        _, state = deepsleepnet(night[:, :3])
        _, halves_state = deepsleepnet(night[:, 3:], state)
    deepsleepnet.train()
    for whole, halves in zip(whole_state[0], halves_state[0]):  # forward direction (h, c)
        torch.testing.assert_close(halves, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_deepsleepnet_gradients_flow(deepsleepnet):
    deepsleepnet.train()
    deepsleepnet.zero_grad()
    logits, _ = deepsleepnet(torch.randn(2, 2, 1, 3000))
    nn.functional.cross_entropy(logits.reshape(-1, 5), torch.tensor([0, 1, 2, 3])).backward()
    for name, param in deepsleepnet.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------- SleepEEGNet

def test_sleepeegnet_teacher_forcing_and_free_running_differ(sleepeegnet):
    sleepeegnet.eval()
    x = torch.randn(2, 4, 1, 3000)
    with torch.no_grad():
        free = sleepeegnet(x)
        # targets chosen to disagree with the free-running predictions at every step
        targets = (free.argmax(-1) + 1) % 5
        forced = sleepeegnet(x, targets=targets)
        not_forced = sleepeegnet(x, targets=targets, teacher_forcing=False)
    sleepeegnet.train()
    assert free.shape == forced.shape == (2, 4, 5)
    torch.testing.assert_close(forced[:, 0], free[:, 0])  # both start from the start token
    assert not torch.allclose(forced[:, 1:], free[:, 1:], atol=1e-5)
    torch.testing.assert_close(not_forced, free)


def test_sleepeegnet_sizes(sleepeegnet):
    assert sleepeegnet.feature_encoder.n_features == 3072
    assert sleepeegnet.encoder_forward.hidden_size == 128
    assert sleepeegnet.decoder_cells[0].hidden_size == 256  # concatenated bidirectional states
    assert not any(isinstance(m, nn.BatchNorm1d) for m in sleepeegnet.modules())
    assert sleepeegnet(torch.randn(2, 3, 3000), return_feats=True).shape == (2, 3, 64)
    uni = SleepEEGNet(bidirectional=False)
    assert uni.decoder_cells[0].hidden_size == 128
    assert uni(torch.randn(2, 3, 1, 3000)).shape == (2, 3, 5)


def test_sleepeegnet_gradients_flow(sleepeegnet):
    sleepeegnet.train()
    sleepeegnet.zero_grad()
    targets = torch.tensor([[0, 1, 2], [3, 4, 0]])
    logits = sleepeegnet(torch.randn(2, 3, 1, 3000), targets=targets)
    nn.functional.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1)).backward()
    for name, param in sleepeegnet.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_unfold_conv_matches_conv1d_and_vmaps():
    """UnfoldConv1d is nn.Conv1d's maths (the MRCNN's first layers use it for speed under vmap)."""
    from torch.func import functional_call, stack_module_state, vmap

    from sleeplib.models.blocks import UnfoldConv1d

    torch.manual_seed(0)
    for chans, kernel, stride, pad in [(1, 50, 6, 24), (1, 400, 50, 200), (3, 7, 2, 3)]:
        fast = UnfoldConv1d(chans, 8, kernel, stride=stride, padding=pad, bias=True)
        ref = torch.nn.Conv1d(chans, 8, kernel, stride=stride, padding=pad, bias=True)
        ref.load_state_dict(fast.state_dict())
        x = torch.randn(4, chans, 3000, dtype=torch.float64)
        fast.double(), ref.double()
        torch.testing.assert_close(fast(x), ref(x))
    folds = [UnfoldConv1d(1, 4, 50, stride=6, padding=24).double() for _ in range(3)]
    params, buffers = stack_module_state(folds)
    xs = torch.randn(3, 2, 1, 600, dtype=torch.float64)
    out = vmap(lambda p, b, x: functional_call(folds[0], (p, b), (x,)))(params, buffers, xs)
    for k, m in enumerate(folds):
        torch.testing.assert_close(out[k], m(xs[k]))
