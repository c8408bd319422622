"""The decoder registry: its names and levels, and every decoder's output alone on random features."""

from __future__ import annotations

import pytest
import torch

from lasegseg.config import ModelConfig
from lasegseg.config_checks import DECODER_NEEDS_BACKBONE
from lasegseg.errors import ConfigError, ModelError
from lasegseg.models.decoders import create_decoder, decoder_levels, decoder_spec, list_decoders, register_decoder
from lasegseg.models.segmenter import build_segmenter

BACKBONE_DECODERS = [name for name in list_decoders() if decoder_spec(name).needs_backbone]


def test_registry_has_the_documented_decoders() -> None:
    assert set(list_decoders()) >= {"linear", "conv", "multiscale", "unetr", "unet"}
    assert not decoder_spec("unet").needs_backbone
    assert all(decoder_spec(n).needs_backbone for n in ("linear", "conv", "multiscale", "unetr"))


def test_the_registry_agrees_with_the_torch_free_declaration() -> None:
    """The config checks model.decoder and its backbone from config_checks.DECODER_NEEDS_BACKBONE, without torch."""
    assert {name: decoder_spec(name).needs_backbone for name in list_decoders()} == DECODER_NEEDS_BACKBONE
    with pytest.raises(ValueError, match="'segformer' is not declared in lasegseg.config_checks"):
        register_decoder("segformer")(lambda **kw: torch.nn.Identity())
    with pytest.raises(ValueError, match="decoder 'unet': needs_backbone=True disagrees with"):
        register_decoder("unet")(lambda **kw: torch.nn.Identity())
    assert "segformer" not in list_decoders() and not decoder_spec("unet").needs_backbone


def test_decoder_levels_come_from_the_registry() -> None:
    assert decoder_levels("linear", 4) == decoder_levels("conv", 4) == (3,)
    assert decoder_levels("multiscale", 4) == decoder_levels("unetr", 4) == (0, 1, 2, 3)
    assert decoder_levels("linear", 1) == decoder_levels("multiscale", 1) == (0,)
    assert decoder_levels("unet", 4) == ()
    with pytest.raises(ValueError, match="decoder 'first-only': levels must be one of all, last, got 'first'"):
        register_decoder("first-only", levels="first")
    with pytest.raises(ModelError, match="unknown decoder 'nope'"):
        decoder_levels("nope", 4)


@pytest.mark.parametrize("name", BACKBONE_DECODERS)
def test_decoder_reads_only_the_levels_it_declares(name: str) -> None:
    """Fed only its declared levels, a decoder gives the logits it gives when fed every level."""
    torch.manual_seed(0)
    decoder = create_decoder(name, embed_dim=24, num_levels=4, patch_size=14, width=16, num_classes=2).eval()
    feats = [torch.randn(2, 24, 8, 8) for _ in range(4)]
    image = torch.rand(2, 1, 112, 112)
    with torch.no_grad():
        every = decoder(feats, image)
        declared = decoder([feats[i] for i in decoder_levels(name, 4)], image)
    assert torch.equal(declared, every)


@pytest.mark.parametrize("name", BACKBONE_DECODERS)
@pytest.mark.parametrize("size", [(112, 112), (100, 121)])
def test_decoder_alone_gives_image_sized_logits(name: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    decoder = create_decoder(name, embed_dim=24, num_levels=4, patch_size=14, width=16, num_classes=3)
    grid = (-(-size[0] // 14), -(-size[1] // 14))
    feats = [torch.randn(2, 24, *grid) for _ in range(4)]
    logits = decoder(feats, torch.rand(2, 1, *size))
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()


def test_unknown_decoder_lists_the_registry() -> None:
    with pytest.raises(ModelError, match="unknown decoder 'segformer'") as err:
        create_decoder("segformer", embed_dim=8, num_levels=4, patch_size=14)
    assert all(name in str(err.value) for name in list_decoders())
    with pytest.raises(ConfigError, match="config key 'model.decoder' must be one of linear, conv, multiscale"):
        build_segmenter(ModelConfig(decoder="segformer"))


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_decoder("linear")(lambda **kw: torch.nn.Identity())
