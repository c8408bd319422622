"""The augmentation registry: every augmentation keeps shapes and integer labels and is reproducible from a seed;
``flip`` and ``spatial`` draw exactly what they did inside the trial (the same seed gives the same batches)."""

from __future__ import annotations

import pytest
import torch

from lasegseg.config import from_flat
from lasegseg.config_checks import AUGMENT_CHOICES
from lasegseg.errors import ConfigError
from lasegseg.train.augment import (
    augment_batch,
    build_augmentation,
    list_augmentations,
    register_augmentation,
)

# Random numbers each augmentation takes from the generator for a batch of b: flips (b × 2), then for ``spatial``
# one angle and one scale per slice.
DRAWS = {"none": lambda b: [], "flip": lambda b: [(b, 2)], "spatial": lambda b: [(b, 2), (b,), (b,)]}


def _batch(b: int = 5, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(b * 10 + size)
    y = torch.zeros(b, 1, size, size, dtype=torch.long)
    y[:, :, 3:9, 4:12] = 1
    y[:, :, 10:13, 2:5] = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).long()
    x = y.float() * 0.7 + 0.2 * torch.rand(b, 1, size, size, generator=gen)
    return x, y


def test_registry_holds_the_declared_names():
    assert list_augmentations() == sorted(AUGMENT_CHOICES) == ["flip", "none", "spatial"]
    assert set(DRAWS) == set(list_augmentations())


@pytest.mark.parametrize("name", list_augmentations())
def test_every_augmentation_keeps_shapes_and_integer_labels(name):
    x, y = _batch()
    ax, ay = build_augmentation(name)(x, y, torch.Generator().manual_seed(0))
    assert ax.shape == x.shape and ay.shape == y.shape
    assert ax.dtype == x.dtype and ay.dtype == torch.long
    assert set(ay.unique().tolist()) <= {0, 1}
    assert torch.isfinite(ax).all()


@pytest.mark.parametrize("name", list_augmentations())
def test_every_augmentation_is_reproducible_from_its_seed(name):
    x, y = _batch()
    ax, ay = augment_batch(x, y, name, torch.Generator().manual_seed(11))
    bx, by = augment_batch(x, y, name, torch.Generator().manual_seed(11))
    assert torch.equal(ax, bx) and torch.equal(ay, by)


@pytest.mark.parametrize("name", list_augmentations())
def test_every_augmentation_draws_what_the_trial_drew(name):
    """The generator moves on by exactly these draws, so later epochs see the same random numbers as before."""
    gen, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    augment_batch(*_batch(b=3), name, gen)
    for shape in DRAWS[name](3):
        torch.rand(*shape, generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_flip_applies_the_drawn_flips_exactly():
    x, y = _batch()
    ax, ay = augment_batch(x, y, "flip", torch.Generator().manual_seed(2))
    flips = torch.rand(x.shape[0], 2, generator=torch.Generator().manual_seed(2)) < 0.5
    for i, (horizontal, vertical) in enumerate(flips.tolist()):
        dims = [d for d, on in ((-1, horizontal), (-2, vertical)) if on]
        expected_x, expected_y = (x[i].flip(dims), y[i].flip(dims)) if dims else (x[i], y[i])
        assert torch.equal(ax[i], expected_x) and torch.equal(ay[i], expected_y)


def test_spatial_moves_images_and_labels_together():
    x, y = _batch(b=8, size=28)
    ax, ay = augment_batch(x, y, "spatial", torch.Generator().manual_seed(4))
    assert not torch.equal(ay, y)
    agree = ((ax > 0.5).long() == ay).float().mean().item()
    assert agree > 0.95
    # Scales in [0.9, 1.1] change the area by at most ~1.23x; nearest resampling of these small shapes adds rounding.
    ratio = ay.sum(dim=(1, 2, 3)).float() / y.sum(dim=(1, 2, 3)).float()
    assert ((ratio > 0.6) & (ratio < 1.5)).all()


def test_unknown_augmentation_lists_the_valid_names():
    x, y = _batch()
    with pytest.raises(ConfigError, match="unknown augmentation 'mixup'") as err:
        augment_batch(x, y, "mixup", torch.Generator())
    assert all(name in str(err.value) for name in list_augmentations())


def test_config_rejects_an_unknown_augmentation_by_key():
    with pytest.raises(ConfigError, match="'train.augment' must be one of none, flip, spatial, got 'mixup'"):
        from_flat({"train.augment": "mixup"})


@pytest.mark.parametrize(("name", "needle"), [("flip", "already registered"), ("mixup", "not declared")])
def test_registering_a_taken_or_undeclared_name_fails(name, needle):
    with pytest.raises(ValueError, match=needle):
        register_augmentation(name)(lambda x, y, generator: (x, y))
    assert list_augmentations() == sorted(AUGMENT_CHOICES)
