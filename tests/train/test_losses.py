"""The plain-torch Dice+CE equals MONAI's DiceCELoss(to_onehot_y=True, softmax=True, batch=True)."""

from __future__ import annotations

import pytest
import torch

from lasegseg.train.losses import DiceCELoss, dice_ce_loss


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
