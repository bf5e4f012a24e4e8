"""Checkpoints: everything needed to resume or rebuild, loaded safely (``weights_only=True``).

A checkpoint holds ``model``, ``optimizer``, ``scheduler``, ``early_stopping``, ``epoch``, ``rng``
(torch and numpy states), ``history`` and the full ``config`` plus ``in_dim``: the file alone
rebuilds the model (:func:`model_from_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stainmil.config import Config, config_from_dict
from stainmil.errors import TrainingError
from stainmil.io import atomic_write
from stainmil.model.registry import build_model


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda tmp: torch.save(state, tmp), suffix=".pth")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist; pass a run's checkpoints/best.pth or last.pth.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); it may be truncated "
                            "— use the other checkpoint of the run.") from exc


def model_from_checkpoint(state: dict[str, Any]) -> tuple[nn.Module, Config]:
    """Rebuild the model (eval mode) and its config from a loaded checkpoint."""
    config = config_from_dict(state["config"])
    model = build_model(int(state["in_dim"]), config.model, config.data.stains)
    weights = dict(state["model"])
    weights.setdefault("seen_stains", model.seen_stains)  # checkpoints from before stain identity: every stain
    model.load_state_dict(weights)
    model.eval()
    return model, config
