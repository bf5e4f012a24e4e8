"""Architectures by name (``model.architecture``), in the style of timm's model registry.

An architecture registers itself where it is defined::

    @register_architecture("clam_sb", reference="Lu et al. 2021: ...", patch_attention=True)
    class CLAM(FlatMIL): ...

and is then built by name with :func:`build_model`, listed by :func:`list_architectures` and described by
:func:`architecture` (its capabilities: what the trainer, analysis and experiments ask instead of comparing
names). Every entry builds an ``nn.Module`` satisfying :class:`stainmil.model.base.MILModel`, so the one trainer,
evaluation, analysis, report and QuPath export treat them all alike. ``stainmil.model`` imports the built-in
architectures, so importing anything from the package fills the registry.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from stainmil.config import ModelConfig
from stainmil.errors import ConfigError


@dataclass(frozen=True)
class ArchitectureSpec:
    """One registered architecture and what it can do."""

    name: str
    build: Callable[[int, ModelConfig, list[str]], nn.Module]
    reference: str
    # attention over patches (heatmaps, top patches, lesion measures), else uniform weights; or, for a model built
    # from others, a function of its options (read it through has_patch_attention)
    patch_attention: bool | Callable[[ModelConfig], bool] = True
    stain_specific: bool = False       # takes model.stain_identity 'specific' (own projector and pools per stain)
    needs_registration: bool = False   # batches must carry patch_anchor (`stainmil register` first)
    patch_positions: bool = False      # reads where patches lie on their slide (CaseBatch.patch_position) if known


ARCHITECTURES: dict[str, ArchitectureSpec] = {}  # name -> spec, in registration order


def register_architecture(name: str, *, reference: str, patch_attention: bool | Callable[[ModelConfig], bool] = True,
                          stain_specific: bool = False,
                          needs_registration: bool = False, patch_positions: bool = False,
                          **build_kwargs: Any) -> Callable:
    """Class (or factory) decorator: register ``name``; ``build_kwargs`` are passed to the constructor (so one
    class can register several variants, e.g. CLAM's single- and multi-branch)."""
    def decorator(cls: Callable) -> Callable:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture '{name}' is registered twice")
        build = partial(cls, **build_kwargs) if build_kwargs else cls
        ARCHITECTURES[name] = ArchitectureSpec(name, build, reference, patch_attention, stain_specific,
                                               needs_registration, patch_positions)
        return cls
    return decorator


def list_architectures(pattern: str = "*") -> list[str]:
    """Registered names matching the shell-style ``pattern`` (e.g. ``"clam*"``), in registration order."""
    return [name for name in ARCHITECTURES if fnmatch.fnmatchcase(name, pattern)]


def architecture(name: str) -> ArchitectureSpec:
    """The spec of ``name``; a ConfigError naming the choices when it is not registered."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"model.architecture '{name}' is not registered; choose one of {list_architectures()}.")
    return ARCHITECTURES[name]


def has_patch_attention(config: ModelConfig) -> bool:
    """Whether ``config.architecture``, with these options, attends over patches (a model built from others
    answers as they do: ``late_fusion`` over ``transmil`` has no patch attention)."""
    value = architecture(config.architecture).patch_attention
    return bool(value(config)) if callable(value) else bool(value)


def build_model(in_dim: int, config: ModelConfig, stains: list[str]) -> nn.Module:
    """The ``config.architecture`` model for ``in_dim``-dimensional features and the stains ``stains`` (model order)."""
    return architecture(config.architecture).build(in_dim, config, list(stains))
