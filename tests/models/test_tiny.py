"""The tiny random backbones and the named sizes' stand-ins: seeded, saved as safetensors once per cache folder, the
first of racing writers kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lasegseg.errors import ModelError
from lasegseg.models import tiny
from lasegseg.models.backbones import Backbone, build_backbone, fingerprint
from lasegseg.models.families import backbone_family
from lasegseg.models.tiny import TINY_SEED, stand_in_dir, stand_in_seed, tiny_backbone_dir

DINOV2 = backbone_family("dinov2")


def _weights(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backbone.model.state_dict().items()}


@pytest.mark.parametrize("registers", [False, True])
def test_tiny_is_saved_as_safetensors_and_reloaded(_cache: Path, registers: bool) -> None:
    first = build_backbone("tiny", registers=registers)
    folder = _cache / "backbones" / ("tiny-reg" if registers else "tiny")
    assert tiny_backbone_dir(registers=registers) == folder
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert first.source == str(folder)
    second = build_backbone("tiny", registers=registers)
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fingerprint(first) == fingerprint(second)
    assert first.num_prefix_tokens == (1 + DINOV2.tiny_num_registers if registers else 1)


def test_tiny_weights_do_not_depend_on_the_cache_or_global_seed(tmp_path: Path, monkeypatch) -> None:
    reference = fingerprint(build_backbone("tiny"))
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    torch.manual_seed(1234)
    fresh = build_backbone("tiny")
    assert fresh.source == str(tmp_path / "backbones" / "tiny")
    assert fingerprint(fresh) == reference


def test_creating_tiny_does_not_move_the_global_rng(tmp_path: Path, monkeypatch) -> None:
    """Otherwise the first trial on a fresh machine (the one that creates the folder) would initialise its decoder
    from another RNG state than every later trial with the same seed."""
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    build_backbone("tiny")  # creates the folder
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(7)
    build_backbone("tiny")  # reloads it
    assert torch.equal(torch.rand(4), expected)


def test_tiny_creation_race_keeps_the_first_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    folder = tiny_backbone_dir()
    before = (folder / "model.safetensors").stat().st_mtime_ns
    # A second process that finished creating after the first one must neither fail nor leave its temp folder.
    tiny._create_tiny(folder, registers=False)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]


def test_tiny_dinov3_is_saved_with_its_registers_and_no_rope_augmentation(_cache: Path) -> None:
    backbone = build_backbone("tiny-dinov3")
    folder = _cache / "backbones" / "tiny-dinov3"
    assert backbone.source == str(folder) and (folder / "model.safetensors").is_file()
    config = backbone.model.config
    assert (config.model_type, config.patch_size, config.num_register_tokens) == ("dinov3_vit", 16, 4)
    assert backbone.num_prefix_tokens == 5
    assert config.pos_embed_rescale is None and config.pos_embed_jitter is None and config.pos_embed_shift is None
    # Training mode is the geometry of inference: the same features in train() and eval().
    x = torch.rand(1, 1, 64, 80)
    with torch.no_grad():
        train = backbone.train()(x)
        test = backbone.eval()(x)
    assert all(torch.equal(a, b) for a, b in zip(train, test, strict=True))


def test_a_folder_in_the_way_that_is_not_a_tiny_model_is_a_model_error(tmp_path: Path, monkeypatch) -> None:
    """An incomplete folder (no config.json) where the tiny model goes is named, and the temp copy is removed."""
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    folder = tmp_path / "backbones" / "tiny"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half written")
    with pytest.raises(ModelError, match=r"cannot create the tiny backbone at '.*tiny' \(remove that folder\)"):
        tiny_backbone_dir()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]


STAND_INS = [("dinov2", "giant"), ("dinov2", "large"), ("dinov3", "large"), ("dinov2", "small")]


@pytest.mark.parametrize(("family", "size"), STAND_INS)
def test_a_stand_in_is_its_family_tiny_model_as_deep_as_the_size_table_reaches(family: str, size: str) -> None:
    fam = backbone_family(family)
    folder = stand_in_dir(family, size)
    assert folder.name == f"stand-in-{family}-{size}" and (folder / "model.safetensors").is_file()
    backbone = build_backbone(str(folder))
    config = backbone.model.config
    assert config.num_hidden_layers == fam.layer_indices[size][-1] + 1  # 40 for giant, 24 for large, 12 for small
    assert (config.patch_size, config.hidden_size) == (fam.patch_size, fam.tiny_config["hidden_size"])
    assert backbone.num_prefix_tokens == (1 + fam.tiny_num_registers if fam.single_variant else 1)


def test_stand_in_weights_are_seeded_by_name_the_same_on_every_machine(tmp_path: Path, monkeypatch) -> None:
    first = fingerprint(build_backbone(str(stand_in_dir("dinov2", "giant"))))
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    torch.manual_seed(99)
    again = build_backbone(str(stand_in_dir("dinov2", "giant")))
    assert again.source == str(tmp_path / "backbones" / "stand-in-dinov2-giant")
    assert fingerprint(again) == first
    assert stand_in_seed("stand-in-dinov2-giant") == stand_in_seed("stand-in-dinov2-giant") != TINY_SEED


def test_stand_ins_of_different_names_have_different_weights() -> None:
    """Their frozen features then never share a cache: a feature cache's key starts with the weights' fingerprint."""
    # dinov2-small and -base share depth and width: only the seed tells them apart.
    small, base = (build_backbone(str(stand_in_dir("dinov2", s))) for s in ("small", "base"))
    a, b = _weights(small), _weights(base)
    assert a.keys() == b.keys()
    assert not torch.equal(
        a["embeddings.patch_embeddings.projection.weight"], b["embeddings.patch_embeddings.projection.weight"]
    )
    names = [f"{f}-{s}" for f, s in STAND_INS] + ["dinov2-base"]
    prints = {fingerprint(build_backbone(str(stand_in_dir(*n.split("-", 1))))) for n in names}
    prints |= {fingerprint(build_backbone(str(stand_in_dir("dinov2", "large", registers=True))))}
    assert len(prints) == len(names) + 1
    assert fingerprint(build_backbone("tiny")) not in prints


def test_a_stand_in_of_an_unknown_size_is_refused() -> None:
    with pytest.raises(ModelError, match="backbone family 'dinov2' has no size 'huge' .*giant"):
        stand_in_dir("dinov2", "huge")
