"""Reading a transformers model of a registered backbone family from a folder or a hub id.

Every backbone, the tiny ones included, comes through :func:`load_model` (``from_pretrained``), so tests exercise
the path real weights take. transformers is imported on the first load only: a frozen trial that decodes cached
features imports this module without ever loading a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lasegseg.errors import ModelError, first_line
from lasegseg.models.families import family_display_names, family_of_model_type


def load_model(source: str, *, local: bool) -> nn.Module:
    """The model at ``source`` with fp32 weights, SDPA attention and its family's load-time config fields.

    Args:
        source: a folder or a hub id.
        local: whether ``source`` is a folder (nothing is fetched then, and no progress bar is shown).

    Raises:
        ModelError: one line naming the source, for a model of no registered family or any load failure.
    """
    import transformers  # deferred: heavy (transformers, seconds; frozen trials on cached features never load)

    where = "folder" if local else "hub id"
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
        family = family_of_model_type(config.model_type)
        if family is None:
            raise ModelError(
                f"backbone {where} '{source}' holds a '{config.model_type}' model, not {family_display_names()}"
            )
        model_class = getattr(transformers, family.model_classes[config.model_type])
        for key, value in family.load_config.items():
            setattr(config, key, value)
        # A local load takes milliseconds: its progress bars would only clutter every trial's log.
        with progress_bars(enabled=not local):
            # fp32 master weights whatever dtype the checkpoint was saved in: without ``dtype`` transformers keeps
            # the checkpoint's (a bf16 one would be fine-tuned in bf16); bf16 compute comes from autocast.
            return model_class.from_pretrained(
                source, config=config, attn_implementation="sdpa", local_files_only=local, dtype=torch.float32
            )
    except ModelError:
        raise
    except Exception as exc:  # hub/IO failures come as many types; report them as one line
        reason = first_line(exc)
        raise ModelError(f"cannot load backbone {where} '{source}': {reason}") from exc


@contextlib.contextmanager
def progress_bars(*, enabled: bool) -> Iterator[None]:
    """transformers' progress bars off for the block when ``enabled`` is false (and back on after it).

    Args:
        enabled: leave them as they are; false turns them off if they are on.
    """
    from transformers.utils import logging as hf_logging  # deferred: heavy (transformers)

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()
