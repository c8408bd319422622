"""Loading a model from a folder or hub id: fp32 weights, one-line errors, and any folder loads like a named one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lasegseg.errors import ModelError
from lasegseg.models.backbones import build_backbone, fingerprint
from lasegseg.models.families import backbone_family, list_backbone_families
from lasegseg.models.loading import progress_bars
from lasegseg.models.tiny import tiny_backbone_dir

TINY_NAMES = [backbone_family(f).tiny_name for f in list_backbone_families()]


def test_unloadable_folder_gives_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot load backbone folder") as err:
        build_backbone(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_folder_with_another_model_type(tmp_path: Path) -> None:
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    with pytest.raises(ModelError, match="'vit' model, not DINOv2"):
        build_backbone(str(tmp_path))


def test_a_bf16_checkpoint_loads_with_fp32_master_weights(tmp_path: Path) -> None:
    """Fine-tuning keeps fp32 master weights whatever dtype the checkpoint was saved in (bf16 comes from autocast)."""
    import transformers

    source = transformers.Dinov2Model.from_pretrained(str(tiny_backbone_dir()), dtype=torch.bfloat16)
    assert next(source.parameters()).dtype == torch.bfloat16
    source.save_pretrained(tmp_path / "bf16")
    loaded = build_backbone(str(tmp_path / "bf16"))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_local_folder_is_loaded_like_any_source() -> None:
    folder = tiny_backbone_dir()
    backbone = build_backbone(str(folder))
    assert backbone.source == str(folder)
    assert backbone.layer_indices == [0, 1, 2, 3]
    assert fingerprint(backbone) == fingerprint(build_backbone("tiny"))


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_saved_and_reloaded_through_from_pretrained_gives_identical_outputs(name: str, tmp_path: Path) -> None:
    first = build_backbone(name).eval()
    first.model.save_pretrained(tmp_path / "copy")
    second = build_backbone(str(tmp_path / "copy")).eval()
    assert fingerprint(second) == fingerprint(first) and second.layer_indices == first.layer_indices
    x = torch.rand(1, 1, 64, 48)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(first(x), second(x), strict=True))


def test_progress_bars_are_off_inside_and_restored_after() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    with progress_bars(enabled=True):
        assert hf_logging.is_progress_bar_enabled()
    with progress_bars(enabled=False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    with pytest.raises(RuntimeError), progress_bars(enabled=False):
        raise RuntimeError("a failed load")
    assert hf_logging.is_progress_bar_enabled()
