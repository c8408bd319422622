"""The loss registry: every loss is finite and gives gradients; each equals its MONAI loss
(``to_onehot_y=True, softmax=True, batch=True``) in value and gradients."""

from __future__ import annotations

import pytest
import torch

from lasegseg.config import from_flat
from lasegseg.config_checks import LOSS_CHOICES
from lasegseg.errors import ConfigError
from lasegseg.train.losses import DiceCELoss, DiceFocalLoss, build_loss, dice_ce_loss, list_losses, register_loss

CASES = [(4, 9, False), (3, 16, True), (1, 5, False)]


def _logits_and_target(batch: int, size: int, empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 100 + size)
    logits = 3 * torch.randn(batch, 2, size, size, generator=gen)
    target = (torch.rand(batch, 1, size, size, generator=gen) < 0.3).long()
    if empty:
        target[0] = 0  # a slice without foreground: batch=True must keep the Dice finite
    return logits, target


@pytest.mark.parametrize(("batch", "size", "empty"), [(4, 9, False), (3, 16, True), (1, 5, False)])
def test_value_and_gradients_match_monai(batch, size, empty):
    from monai.losses import DiceCELoss as MonaiDiceCE

    gen = torch.Generator().manual_seed(batch * 100 + size)
    logits = (3 * torch.randn(batch, 2, size, size, generator=gen)).requires_grad_(True)
    target = (torch.rand(batch, 1, size, size, generator=gen) < 0.3).long()
    if empty:
        target[0] = 0  # a slice without foreground: batch=True must keep the Dice finite
    ours_logits = logits.detach().clone().requires_grad_(True)

    ref = MonaiDiceCE(to_onehot_y=True, softmax=True, batch=True)(logits, target)
    ours = DiceCELoss()(ours_logits, target)
    ref.backward()
    ours.backward()
    assert torch.isfinite(ours)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(ours_logits.grad, logits.grad, rtol=1e-5, atol=1e-8)


def test_accepts_targets_without_channel_and_penalises_wrong_predictions():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[:, 1:3, 1:3] = 1
    right = torch.stack([1 - target, target], dim=1).float() * 20 - 10
    assert dice_ce_loss(right, target) == pytest.approx(dice_ce_loss(right, target[:, None]).item())
    assert dice_ce_loss(right, target).item() < 0.01
    assert dice_ce_loss(-right, target).item() > 5.0


@pytest.mark.parametrize(("batch", "size", "empty"), CASES)
@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_dice_focal_value_and_gradients_match_monai(batch, size, empty, gamma):
    from monai.losses import DiceFocalLoss as MonaiDiceFocal

    logits, target = _logits_and_target(batch, size, empty)
    ref_logits = logits.clone().requires_grad_(True)
    ours_logits = logits.clone().requires_grad_(True)

    ref = MonaiDiceFocal(to_onehot_y=True, softmax=True, batch=True, gamma=gamma)(ref_logits, target)
    ours = DiceFocalLoss(gamma=gamma)(ours_logits, target)
    ref.backward()
    ours.backward()
    assert torch.isfinite(ours)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(ours_logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-8)


def test_dice_focal_default_is_monais_default_gamma():
    from monai.losses import DiceFocalLoss as MonaiDiceFocal

    logits, target = _logits_and_target(2, 7, False)
    ref = MonaiDiceFocal(to_onehot_y=True, softmax=True, batch=True)(logits, target)
    assert build_loss("dicefocal")(logits, target).item() == pytest.approx(ref.item(), rel=1e-6)


def test_registry_holds_the_declared_names_and_builds_fresh_modules():
    assert list_losses() == sorted(LOSS_CHOICES) == ["dicece", "dicefocal"]
    assert isinstance(build_loss("dicece"), DiceCELoss)
    assert isinstance(build_loss("dicefocal"), DiceFocalLoss)
    assert build_loss("dicece") is not build_loss("dicece")
    assert isinstance(build_loss(from_flat({}).train.loss), DiceCELoss)  # the default config keeps Dice+CE


@pytest.mark.parametrize("name", list_losses())
@pytest.mark.parametrize(("batch", "size", "empty"), CASES)
def test_every_loss_is_finite_and_its_gradient_flows(name, batch, size, empty):
    logits, target = _logits_and_target(batch, size, empty)
    logits.requires_grad_(True)
    loss = build_loss(name)(logits, target)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_losses())
def test_every_loss_prefers_right_predictions_and_stays_finite_when_confident(name):
    loss_fn = build_loss(name)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[:, 1:3, 1:3] = 1
    right = (torch.stack([1 - target, target], dim=1).float() * 100 - 50).requires_grad_(True)
    assert loss_fn(right, target).item() == pytest.approx(loss_fn(right, target[:, None]).item())
    assert loss_fn(right, target).item() < 0.01
    assert loss_fn(-right, target).item() > 1.0
    loss_fn(-right, target).backward()
    assert torch.isfinite(right.grad).all()


def test_unknown_loss_lists_the_valid_names():
    with pytest.raises(ConfigError, match="unknown loss 'dice'") as err:
        build_loss("dice")
    assert all(name in str(err.value) for name in list_losses())


def test_config_rejects_an_unknown_loss_by_key():
    with pytest.raises(ConfigError, match="'train.loss' must be one of dicece, dicefocal, got 'focal'"):
        from_flat({"train.loss": "focal"})
    assert from_flat({"train.loss": "dicefocal"}).train.loss == "dicefocal"


@pytest.mark.parametrize(("name", "needle"), [("dicece", "already registered"), ("tversky", "not declared")])
def test_registering_a_taken_or_undeclared_name_fails(name, needle):
    with pytest.raises(ValueError, match=needle):
        register_loss(name)(DiceCELoss)
    assert list_losses() == sorted(LOSS_CHOICES)
