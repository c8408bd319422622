"""The segmenter: every decoder in every mode trains what it should, optimiser groups and strict checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lasegseg.config import ModelConfig, from_flat
from lasegseg.config_checks import MODES
from lasegseg.errors import ConfigError, ModelError
from lasegseg.models.backbones import weights_fingerprint
from lasegseg.models.decoders import FOREGROUND_PRIOR, decoder_levels, decoder_spec, list_decoders
from lasegseg.models.segmenter import (
    FROZEN_FEATURE_DTYPE,
    Segmenter,
    build_segmenter,
    check_model_config,
    checkpoint_metadata,
    load_checkpoint_state,
    param_groups,
    state_for_checkpoint,
)
from lasegseg.models.sources import STAND_IN_ENV

BACKBONE_DECODERS = [name for name in list_decoders() if decoder_spec(name).needs_backbone]
# Registry × modes; decoders without backbone ignore the mode, so they run once.
CASES = [
    (name, mode) for name in list_decoders() for mode in (MODES if decoder_spec(name).needs_backbone else MODES[1:2])
]
CASE_IDS = [f"{name}-{mode}" for name, mode in CASES]


def _build(decoder: str, mode: str, seed: int = 0, **kw) -> Segmenter:
    torch.manual_seed(seed)
    backbone = "tiny" if decoder_spec(decoder).needs_backbone else "none"
    return build_segmenter(ModelConfig(backbone=backbone, decoder=decoder, mode=mode, decoder_width=32, **kw))


def _step(seg: Segmenter, x: torch.Tensor) -> None:
    """One AdamW step on a loss that depends on every output pixel."""
    optimizer = torch.optim.AdamW(param_groups(seg, 1e-2, 1.0, 0.1))
    seg.train()
    optimizer.zero_grad()
    seg(x).log_softmax(1)[:, 1].mean().neg().backward()
    optimizer.step()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", BACKBONE_DECODERS)
def test_segmenter_hands_the_decoder_its_levels(name: str, mode: str) -> None:
    seg = _build(name, mode).eval()
    assert seg.levels == decoder_levels(name, seg.backbone.num_features_levels)
    x = torch.rand(2, 1, 100, 100)
    with torch.no_grad():
        feats = seg.features(x)
        every = seg.backbone(x)
    assert len(feats) == len(seg.levels)
    for f, i in zip(feats, seg.levels, strict=True):
        # A frozen backbone's features are fp16 values (those a feature cache stores).
        ref = every[i].to(FROZEN_FEATURE_DTYPE).float() if mode == "frozen" else every[i]
        assert torch.equal(f, ref)


@pytest.mark.parametrize(("name", "mode"), CASES, ids=CASE_IDS)
def test_every_pixel_starts_as_background_with_the_prior(name: str, mode: str) -> None:
    seg = _build(name, mode).eval()
    with torch.no_grad():
        foreground = seg(torch.rand(2, 1, 112, 112)).softmax(1)[:, 1]
    # Random features spread the logits around the prior bias (most in the UNet, whose output has a residual).
    assert FOREGROUND_PRIOR / 5 < foreground.mean().item() < FOREGROUND_PRIOR * 5


@pytest.mark.parametrize(("name", "mode"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("size", [112, 100])
def test_forward_backward_every_trainable_parameter_gets_a_gradient(name: str, mode: str, size: int) -> None:
    seg = _build(name, mode).train()
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in seg.decoder.parameters() if p.ndim == 4)
    x = torch.rand(2, 1, size, size)
    logits = seg(x)
    assert logits.shape == (2, 2, size, size)
    assert torch.isfinite(logits).all()
    logits.log_softmax(1)[:, 1].mean().neg().backward()
    trainable = {n: p for n, p in seg.named_parameters() if p.requires_grad}
    assert trainable
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"trainable parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    assert all(p.grad is None for p in seg.parameters() if not p.requires_grad)
    assert sum(p.grad.abs().sum() for p in trainable.values()) > 0


@pytest.mark.parametrize("name", BACKBONE_DECODERS)
def test_frozen_backbone_gets_no_gradient_and_does_not_change(name: str) -> None:
    seg = _build(name, "frozen")
    assert not any(p.requires_grad for p in seg.backbone.parameters())
    before = {k: v.clone() for k, v in seg.backbone.state_dict().items()}
    seg.train()
    assert seg.decoder.training and not seg.backbone.training
    x = torch.rand(2, 1, 112, 112)
    assert not any(f.requires_grad for f in seg.features(x))
    decoder_before = [p.clone() for p in seg.decoder.parameters()]
    _step(seg, x)
    assert all(p.grad is None for p in seg.backbone.parameters())
    after = seg.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, seg.decoder.parameters(), strict=True))


@pytest.mark.parametrize("name", BACKBONE_DECODERS)
def test_lora_trains_only_adapters_in_the_backbone(name: str) -> None:
    seg = _build(name, "lora", lora_rank=4, lora_alpha=8.0)
    backbone_trainable = [n for n, p in seg.backbone.named_parameters() if p.requires_grad]
    assert backbone_trainable and all("lora_" in n for n in backbone_trainable)
    per_layer = {n.split(".attention.")[1].split(".")[0] for n in backbone_trainable}
    assert per_layer == {"q_proj", "v_proj"} or per_layer == {"query", "value"}
    assert all(p.requires_grad for p in seg.decoder.parameters())
    base_before = {k: v.clone() for k, v in seg.backbone.state_dict().items() if "lora_" not in k}
    lora_b_before = {n: p.clone() for n, p in seg.backbone.named_parameters() if "lora_B" in n}
    x = torch.rand(2, 1, 112, 112)
    _step(seg, x)
    # lora_B starts at zero so the adapter starts as the identity; it is the one that moves first.
    grads = {n: p.grad for n, p in seg.backbone.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(grads[n].abs().sum() > 0 for n in lora_b_before)
    assert all(not torch.equal(lora_b_before[n], p) for n, p in seg.backbone.named_parameters() if n in lora_b_before)
    after = seg.backbone.state_dict()
    assert all(torch.equal(base_before[k], after[k]) for k in base_before)


def test_finetune_trains_the_whole_backbone_but_the_mask_token() -> None:
    seg = _build("multiscale", "finetune")
    frozen = [n for n, p in seg.named_parameters() if not p.requires_grad]
    assert frozen == ["backbone.model.embeddings.mask_token"]
    before = weights_fingerprint(seg.backbone.model)
    _step(seg, torch.rand(2, 1, 112, 112))
    assert weights_fingerprint(seg.backbone.model) != before
    # The stored fingerprint names the source, so a fine-tuned checkpoint still matches a fresh build.
    assert checkpoint_metadata(seg) == checkpoint_metadata(_build("multiscale", "finetune"))


def test_registers_variant_in_every_mode() -> None:
    for mode in MODES:
        seg = _build("multiscale", mode, registers=True)
        assert seg.backbone.num_prefix_tokens == 5
        assert seg(torch.rand(1, 1, 112, 112)).shape == (1, 2, 112, 112)


def test_param_groups_split_lr_and_weight_decay() -> None:
    seg = _build("multiscale", "finetune")
    groups = {g["name"]: g for g in param_groups(seg, 1e-3, 0.1, 0.05)}
    assert set(groups) == {"decoder", "decoder_no_decay", "backbone", "backbone_no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["decoder"]["lr"] == pytest.approx(1e-3)
    assert groups["decoder"]["weight_decay"] == 0.05 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in seg.parameters() if p.requires_grad)
    no_decay = {id(p) for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    named = dict(seg.named_parameters())
    for key in (
        "decoder.level_weights",
        "decoder.head.bias",
        "backbone.model.layernorm.weight",
        "backbone.model.embeddings.position_embeddings",
        "backbone.model.embeddings.cls_token",
    ):
        assert id(named[key]) in no_decay, key
    assert id(named["decoder.head.weight"]) not in no_decay


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("frozen", {"decoder", "decoder_no_decay"}), ("lora", {"decoder", "decoder_no_decay", "backbone"})],
)
def test_param_groups_of_frozen_and_lora(mode: str, expected: set[str]) -> None:
    groups = param_groups(_build("conv", mode), 1e-3, 0.1, 0.05)
    assert {g["name"] for g in groups} == expected
    # LoRA adapters learn at the base rate: the multiplier is for fine-tuning pretrained weights.
    assert all(g["lr"] == pytest.approx(1e-3) for g in groups)


@pytest.mark.parametrize(("name", "mode"), CASES, ids=CASE_IDS)
def test_checkpoint_roundtrip_reproduces_outputs(name: str, mode: str, tmp_path: Path) -> None:
    seg = _build(name, mode)
    x = torch.rand(2, 1, 100, 100)
    _step(seg, x)  # moves weights, BatchNorm statistics and LoRA adapters away from their init
    state = state_for_checkpoint(seg)
    save_file(state, tmp_path / "model.safetensors", metadata=checkpoint_metadata(seg))
    if seg.backbone is not None and mode != "finetune":
        assert not any(k.startswith("backbone.") and "lora_" not in k for k in state)
        assert any("lora_" in k for k in state) == (mode == "lora")
    else:
        assert state.keys() == seg.state_dict().keys()

    fresh = _build(name, mode, seed=1)
    load_checkpoint_state(fresh, load_file(tmp_path / "model.safetensors"), checkpoint_metadata(seg))
    seg.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), seg(x), rtol=0, atol=0)


def test_checkpoint_tensors_do_not_share_memory() -> None:
    seg = _build("linear", "finetune")
    state = state_for_checkpoint(seg)
    live = {p.data_ptr() for p in seg.state_dict().values()}
    assert all(t.is_contiguous() and t.data_ptr() not in live for t in state.values())


def test_checkpoint_load_is_strict() -> None:
    seg = _build("multiscale", "lora")
    state = state_for_checkpoint(seg)
    missing = dict(state)
    missing.pop("decoder.head.weight")
    with pytest.raises(ModelError, match=r"1 missing key\(s\) \[decoder.head.weight\]"):
        load_checkpoint_state(_build("multiscale", "lora"), missing)
    with pytest.raises(ModelError, match=r"1 unexpected key\(s\) \[decoder.extra\]"):
        load_checkpoint_state(_build("multiscale", "lora"), {**state, "decoder.extra": torch.zeros(1)})
    wrong = {**state, "decoder.level_weights": torch.zeros(5)}
    with pytest.raises(ModelError, match="another shape"):
        load_checkpoint_state(_build("multiscale", "lora"), wrong)
    # A frozen checkpoint lacks the base weights, so loading it into a finetune model must not pass silently.
    with pytest.raises(ModelError, match="missing key"):
        load_checkpoint_state(_build("multiscale", "finetune"), state_for_checkpoint(_build("multiscale", "frozen")))


def test_checkpoint_metadata_guards_backbone_and_mode() -> None:
    seg = _build("conv", "frozen")
    state, meta = state_for_checkpoint(seg), checkpoint_metadata(seg)
    assert meta["mode"] == "frozen" and len(meta["backbone_fingerprint"]) == 16
    with pytest.raises(ModelError, match="fingerprint"):
        load_checkpoint_state(_build("conv", "frozen"), state, {**meta, "backbone_fingerprint": "0" * 16})
    with pytest.raises(ModelError, match="mode 'lora'"):
        load_checkpoint_state(_build("conv", "frozen"), state, {**meta, "mode": "lora"})


@pytest.mark.parametrize("check", [build_segmenter, check_model_config])
def test_backbone_none_requires_an_image_only_decoder(check) -> None:
    with pytest.raises(ConfigError, match="model.decoder"):
        check(ModelConfig(backbone="none", decoder="multiscale"))
    with pytest.raises(ConfigError, match="model.backbone"):
        check(ModelConfig(backbone="tiny", decoder="unet"))


def test_check_model_config_catches_names_and_modes() -> None:
    check_model_config(ModelConfig(backbone="dinov2-giant", registers=True, decoder="unetr", mode="lora"))
    check_model_config(ModelConfig(backbone="none", decoder="unet"))
    with pytest.raises(ConfigError, match="config key 'model.decoder' must be one of linear, conv, multiscale"):
        check_model_config(ModelConfig(decoder="segformer"))
    with pytest.raises(ConfigError, match="config key 'model.backbone' must be a backbone name .*, got 'vit-b'"):
        check_model_config(ModelConfig(backbone="vit-b"))
    with pytest.raises(ConfigError, match="model.mode"):
        check_model_config(ModelConfig(mode="partial"))


# Every model section the segmenter refuses from its config alone, and the key the refusal names.
REFUSED = [
    ({"backbone": "none", "decoder": "multiscale"}, "model.decoder"),
    ({"backbone": "tiny", "decoder": "unet"}, "model.backbone"),
    ({"backbone": "dinov2-giant", "decoder": "unet"}, "model.backbone"),
    ({"decoder": "segformer"}, "model.decoder"),
    ({"backbone": "tinyy"}, "model.backbone"),
    ({"backbone": "dinov2-huge"}, "model.backbone"),
    ({"backbone": "tiny-dinov3", "registers": True}, "model.registers"),
    ({"backbone": "dinov3-large", "registers": True}, "model.registers"),
    ({"mode": "partial"}, "model.mode"),
    ({"mode": "lora", "lora_rank": 0}, "model.lora_rank"),
    ({"mode": "lora", "lora_alpha": 0.0}, "model.lora_alpha"),
    ({"mode": "lora", "lora_dropout": 1.0}, "model.lora_dropout"),
    ({"decoder_width": 2}, "model.decoder_width"),
    ({"backbone_lr_mult": 0.0}, "model.backbone_lr_mult"),
]


@pytest.mark.parametrize(("model", "key"), REFUSED, ids=[f"{k}-{i}" for i, (_, k) in enumerate(REFUSED)])
def test_the_segmenter_refuses_what_every_config_refuses_with_the_same_message(model: dict, key: str) -> None:
    """One check: what building a model refuses from its config alone, building the config refuses already (so a
    sweep's up-front check and --dry-run catch it), with the same one-line message, before any weights load."""
    with pytest.raises(ConfigError, match=f"config key '{key}' ") as built:
        build_segmenter(ModelConfig(**model))
    with pytest.raises(ConfigError) as flat:
        from_flat({f"model.{k}": v for k, v in model.items()})
    assert str(flat.value) == str(built.value)


def test_what_depends_on_the_machine_is_left_to_the_segmenter(tmp_path: Path) -> None:
    """A folder named as the backbone may exist only where trials run: the config accepts it, the model checks it."""
    missing = str(tmp_path / "no-such-backbone")
    assert from_flat({"model.backbone": missing}).model.backbone == missing
    with pytest.raises(ModelError, match="backbone folder .* does not exist"):
        check_model_config(ModelConfig(backbone=missing))


def test_unet_baseline_ignores_the_mode() -> None:
    seg = _build("unet", "frozen")
    assert seg.backbone is None and seg.mode == "finetune"
    assert all(p.requires_grad for p in seg.parameters())
    assert seg.features(torch.rand(1, 1, 112, 112)) == [] and seg.levels == ()


@pytest.mark.parametrize("mode", MODES)
def test_tiny_dinov3_trains_and_checkpoints_in_every_mode(mode: str, tmp_path: Path) -> None:
    """The DINOv3 family through the segmenter: gradients where the mode trains, and a strict checkpoint round trip."""
    cfg = ModelConfig(backbone="tiny-dinov3", decoder="multiscale", mode=mode, decoder_width=16)
    torch.manual_seed(0)
    seg = build_segmenter(cfg)
    x = torch.rand(2, 1, 64, 48)
    _step(seg, x)
    trainable = [n for n, p in seg.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in seg.parameters() if p.requires_grad)
    assert any(n.startswith("backbone.") for n in trainable) == (mode != "frozen")
    save_file(state_for_checkpoint(seg), tmp_path / "model.safetensors", metadata=checkpoint_metadata(seg))
    torch.manual_seed(1)
    fresh = build_segmenter(cfg)
    load_checkpoint_state(fresh, load_file(tmp_path / "model.safetensors"), checkpoint_metadata(seg))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), seg.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize(("backbone", "mode"), [("dinov2-giant", "lora"), ("dinov3-large", "finetune")])
def test_a_stand_in_takes_the_real_size_paths_checkpointing_and_lora(monkeypatch, backbone: str, mode: str) -> None:
    """What depends on the real size works on its stand-in: deep enough for the size's taps and for gradient
    checkpointing to switch itself on (24+ blocks), with the family's LoRA targets; a step trains what it should."""
    monkeypatch.setenv(STAND_IN_ENV, "1")
    torch.manual_seed(0)
    seg = build_segmenter(ModelConfig(backbone=backbone, decoder="unetr", mode=mode, decoder_width=16))
    config = seg.backbone.model.config
    assert seg.backbone.source.endswith(f"stand-in-{backbone}")
    assert seg.levels == (0, 1, 2, 3) and seg.backbone.layer_indices[-1] == config.num_hidden_layers - 1
    assert seg.backbone.model.is_activation_checkpointing
    trained = {n for n, p in seg.backbone.named_parameters() if p.requires_grad}
    assert trained and all(("lora_" in n) == (mode == "lora") for n in trained)
    side = 2 * config.patch_size
    seg(torch.rand(2, 1, side, side)).logsumexp(1).mean().backward()
    # lora_B starts at zero, so lora_A's first gradient is zero: B is the one that moves first.
    moved = [p for n, p in seg.backbone.named_parameters() if n in trained and "lora_A" not in n]
    assert moved and all(p.grad is not None and p.grad.abs().sum() > 0 for p in moved)
