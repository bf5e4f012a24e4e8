"""Architectures by name (``model.architecture``): the hierarchical model, its aligned variant and the flat
baselines.

Every entry builds an ``nn.Module`` with the same interface — ``forward(batch) -> MILOutput``,
``set_feature_statistics``, ``set_seen_stains``, ``patch_alone_logits`` — so the one trainer, evaluation,
analysis, report and QuPath export treat them all alike. A new architecture plugs in here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from stainmil.config import ModelConfig
from stainmil.errors import ConfigError
from stainmil.model.aligned import AlignedMIL
from stainmil.model.baselines.abmil import ABMIL
from stainmil.model.baselines.clam import CLAM
from stainmil.model.baselines.dsmil import DSMIL
from stainmil.model.baselines.dtfd import DTFDMIL
from stainmil.model.baselines.pooling import MaxPoolMIL, MeanPoolMIL
from stainmil.model.baselines.transmil import TransMIL
from stainmil.model.hierarchical import HierarchicalMIL


@dataclass(frozen=True)
class Architecture:
    build: Callable[[int, ModelConfig, list[str]], nn.Module]
    patch_attention: bool
    reference: str
    stain_specific: bool = False  # takes model.stain_identity 'specific' (its own projector and pools per stain)


ARCHITECTURES: dict[str, Architecture] = {
    "hierarchical": Architecture(HierarchicalMIL, True, "stainmil: attention patch -> slice -> stain -> case",
                                 stain_specific=True),
    "aligned": Architecture(AlignedMIL, True, "stainmil: hierarchy over registered H&E+IHC places",
                            stain_specific=True),
    "abmil": Architecture(ABMIL, True, "Ilse et al. 2018: gated attention"),
    "clam_sb": Architecture(CLAM, True, "Lu et al. 2021: one branch, instance clustering"),
    "clam_mb": Architecture(partial(CLAM, multi_branch=True), True,
                            "Lu et al. 2021: a branch per class, instance clustering"),
    "dsmil": Architecture(DSMIL, True, "Li et al. 2021: max-instance + attention streams"),
    "dtfd_mil": Architecture(DTFDMIL, True, "Zhang et al. 2022: two tiers of pseudo-bags, AFS"),
    "transmil": Architecture(TransMIL, False, "Shao et al. 2021: transformer with PPEG"),
    "mean": Architecture(MeanPoolMIL, False, "floor: mean of the projected patches"),
    "max": Architecture(MaxPoolMIL, False, "floor: feature-wise max of the projected patches"),
}


def build_model(in_dim: int, config: ModelConfig, stains: list[str]) -> nn.Module:
    """The ``config.architecture`` model for ``in_dim``-dimensional features and the stains ``stains`` (model order)."""
    if config.architecture not in ARCHITECTURES:
        raise ConfigError(f"model.architecture '{config.architecture}' is not registered; choose one of "
                          f"{sorted(ARCHITECTURES)}.")
    return ARCHITECTURES[config.architecture].build(in_dim, config, list(stains))
