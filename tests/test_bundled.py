"""The rules shipped in pretrained/ load from the installed package and are usable as documented."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from learned_optim import LearnedOptimizer, list_pretrained, load_rule
from learned_optim.weights import CONFIG_NAME, DEFAULT_RULE, MODEL_CARD_NAME, WEIGHTS_NAME, bundled_dir

BUNDLED = list_pretrained()


def test_default_rule_is_bundled_and_used_without_arguments():
    assert DEFAULT_RULE in BUNDLED
    model = nn.Linear(4, 2)
    opt = LearnedOptimizer(model.parameters())
    reference = load_rule(DEFAULT_RULE)
    assert opt.rule.rule_type == reference.rule_type
    for (name, a), (_, b) in zip(opt.rule.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_rule_files_and_model_card(name):
    folder = bundled_dir() / name
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME])
    card = (folder / MODEL_CARD_NAME).read_text()
    # The card must say how to reproduce the weights and how they were evaluated.
    assert "learned-optim meta-fit" in card
    assert "| task | steps |" in card
    metadata = json.loads((folder / CONFIG_NAME).read_text())["metadata"]
    assert metadata["command"].startswith("learned-optim meta-fit")
    assert metadata["meta_training_seconds"] > 0


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_rule_lowers_a_loss(name):
    # A tiny regression none of the rules was trained on: the loss must fall.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(128, 8)
    y = x[:, :1] * 0.5 - x[:, 1:2]
    opt = LearnedOptimizer(model.parameters(), pretrained=name)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    final = nn.functional.mse_loss(model(x), y).item()
    assert final < 0.5 * first


def _scaled_regression(seed: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """Least squares whose solution has weights around 100, from zero: a step size of ~1e-3 per
    coordinate (Adam's default) would need ~10^5 steps; the learning rate must grow."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(256, 32, generator=gen)
    targets = inputs @ (100 * torch.randn(32, 1, generator=gen))
    model = nn.Linear(32, 1, bias=False)
    nn.init.zeros_(model.weight)
    return model, inputs, targets


@pytest.mark.parametrize("seed", [0, 1])
def test_hrnn_base_adapts_its_learning_rate_to_the_problem_scale(seed):
    """What the hierarchical rule is for (its card): it solves a problem far off the scale of its
    initial learning rate, which Adam at its default lr does not start to. (Its step cap, 5% of
    the parameters' RMS per step, makes the growth from zero take ~300 steps; 400 are run.)"""
    losses = {}
    for name in ("hrnn-base", "adam"):
        model, inputs, targets = _scaled_regression(seed)
        opt = LearnedOptimizer(model.parameters(), "hrnn-base") if name == "hrnn-base" else None
        opt = opt or torch.optim.Adam(model.parameters(), lr=1e-3)
        for step in range(400):
            loss = nn.functional.mse_loss(model(inputs), targets)
            if step == 0:
                initial = loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[name] = nn.functional.mse_loss(model(inputs), targets).item() / initial
    assert losses["hrnn-base"] < 1e-6, losses
    assert losses["adam"] > 0.9, losses


def test_lstm_mnist_gain_shrinks_the_steps_of_a_tensor_whose_gradient_just_grew():
    """What its gain was meta-trained for (its card): a tensor whose gradient norm jumped after a
    step (log ratio ~1-3, ReLU MLPs at lr=1) gets smaller steps; one whose gradient shrank does not."""
    rule = load_rule("lstm-mnist-gain")
    rows = torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [-0.5, -0.5, -0.5]])
    grew, flat, shrank = rule.step_gains(rows).tolist()
    assert grew < 0.7 < flat < shrank
