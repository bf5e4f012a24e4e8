"""Architectures by name (``model.architecture``), in the style of timm's model registry.

An architecture registers itself where it is defined, with every fact about it in that one entry::

    @dataclass(frozen=True)
    class CLAMOptions:
        k_sample: int = setting("Patches taken from each end of the attention ranking ...", default=8)

    @register_architecture("clam_sb", reference="Lu et al. 2021: ...", options=CLAMOptions)
    class CLAM(FlatMIL): ...

- ``options``: a frozen dataclass of the architecture's own settings, read from ``model.options.<name>`` with the
  same typed validation as the rest of the config (:func:`options_of`), documented by the generated reference;
- its capabilities: ``patch_attention`` (a value, or a function of the model config for a model built from others),
  ``stain_identities`` (the ``model.stain_identity`` choices it takes), ``needs_registration``,
  ``patch_positions``.

It is then built by name with :func:`build_model` (which hands the class its options), listed by
:func:`list_architectures` and described by :func:`architecture`: the trainer, analysis and experiments ask these
facts here instead of comparing names, and no model class repeats them. Every entry builds an ``nn.Module``
satisfying :class:`stainmil.model.base.MILModel`. ``stainmil.model`` imports the built-in architectures, so
importing anything from the package fills the registry.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from stainmil.config import ModelConfig, settings_from_dict, settings_reference
from stainmil.errors import ConfigError

# every model.stain_identity choice, from the config's own annotation (one list of names)
STAIN_IDENTITIES: tuple[str, ...] = typing.get_args(typing.get_type_hints(ModelConfig)["stain_identity"])
# what a model pooling one bag per case can take: a per-stain vector on each patch, or none
FLAT_STAIN_IDENTITIES = ("none", "embedding", "gated")


@dataclass(frozen=True)
class ArchitectureSpec:
    """One registered architecture: how to build it, its options and what it can do."""

    name: str
    build: Callable[..., nn.Module]
    reference: str
    options: type | None = None        # frozen dataclass of model.options.<name>; None: the architecture has none
    # attention over patches (heatmaps, top patches, lesion measures), else uniform weights; or, for a model built
    # from others, a function of the model config (read it through has_patch_attention)
    patch_attention: bool | Callable[[ModelConfig], bool] = True
    stain_identities: tuple[str, ...] = FLAT_STAIN_IDENTITIES  # the model.stain_identity values it takes
    needs_registration: bool = False   # batches must carry patch_anchor (`stainmil register` first)
    patch_positions: bool = False      # reads where patches lie on their slide (PatchContext.position) if known
    # tens of millions of parameters: Adam/AdamW take their fused kernel (one pass over each tensor, ~8x faster a
    # step on CPU; the last bits of its numbers differ from the per-tensor step every other model takes)
    fused_optimizer: bool = False


ARCHITECTURES: dict[str, ArchitectureSpec] = {}  # name -> spec, in registration order


def register_architecture(name: str, *, reference: str, options: type | None = None,
                          patch_attention: bool | Callable[[ModelConfig], bool] = True,
                          stain_identities: tuple[str, ...] = FLAT_STAIN_IDENTITIES,
                          needs_registration: bool = False, patch_positions: bool = False,
                          fused_optimizer: bool = False, **build_kwargs: Any) -> Callable:
    """Class (or factory) decorator: register ``name``; ``build_kwargs`` are passed to the constructor (so one
    class can register several variants, e.g. CLAM's single- and multi-branch)."""
    unknown = sorted(set(stain_identities) - set(STAIN_IDENTITIES))
    if unknown:
        raise ValueError(f"architecture '{name}': stain identities {unknown} are not model.stain_identity choices")
    if options is not None and not (dataclasses.is_dataclass(options) and options.__dataclass_params__.frozen):
        raise ValueError(f"architecture '{name}': options must be a frozen dataclass, got {options!r}")

    def decorator(cls: Callable) -> Callable:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture '{name}' is registered twice")
        build = partial(cls, **build_kwargs) if build_kwargs else cls
        ARCHITECTURES[name] = ArchitectureSpec(name, build, reference, options, patch_attention,
                                               tuple(stain_identities), needs_registration, patch_positions,
                                               fused_optimizer)
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


def options_of(config: ModelConfig, name: str | None = None) -> Any:
    """The options of architecture ``name`` (default ``config.architecture``): ``model.options.<name>`` over the
    options dataclass's defaults, validated (an unknown key or a wrong type is named); None when it has none."""
    name = name or config.architecture
    spec = architecture(name)
    given = config.options.get(name) or {}
    if spec.options is None:
        if given:
            raise ConfigError(f"model.options.{name} is set, but architecture '{name}' has no options; remove it.")
        return None
    if not isinstance(given, dict):
        raise ConfigError(f"model.options.{name} must be a mapping of settings, got {given!r}.")
    return settings_from_dict(spec.options, given, f"model.options.{name}.")


def check_model_config(config: ModelConfig) -> None:
    """Fail early, with the setting named, when ``config`` asks an architecture for what it has not: an unknown
    architecture, a stain identity it does not take, options of an unknown architecture or with a bad value."""
    spec = architecture(config.architecture)
    if config.stain_identity not in spec.stain_identities:
        raise ConfigError(f"model.stain_identity '{config.stain_identity}' is not one {spec.name} takes; choose one "
                          f"of {list(spec.stain_identities)}.")
    for name in config.options:
        if name not in ARCHITECTURES:
            raise ConfigError(f"model.options.{name}: '{name}' is not an architecture; choose from "
                              f"{list_architectures()}.")
        options_of(config, name)


def has_patch_attention(config: ModelConfig) -> bool:
    """Whether ``config.architecture``, with these options, attends over patches (a model built from others
    answers as they do: ``late_fusion`` over ``transmil`` has no patch attention)."""
    value = architecture(config.architecture).patch_attention
    return bool(value(config)) if callable(value) else bool(value)


def build_model(in_dim: int, config: ModelConfig, stains: list[str]) -> nn.Module:
    """The ``config.architecture`` model for ``in_dim``-dimensional features and the stains ``stains`` (model order),
    built with its options (``options=`` of its class) after :func:`check_model_config`."""
    check_model_config(config)
    spec = architecture(config.architecture)
    if spec.options is None:
        return spec.build(in_dim, config, list(stains))
    return spec.build(in_dim, config, list(stains), options=options_of(config))


def architecture_rows() -> list[dict[str, str]]:
    """One row per architecture for ``stainmil models`` and the reference: its capabilities and reference."""
    rows = []
    for name, spec in ARCHITECTURES.items():
        attention = spec.patch_attention
        rows.append({"name": name,
                     "attention": "as its base" if callable(attention) else "yes" if attention else "no",
                     "stain identity": ", ".join(spec.stain_identities),
                     "needs": "registration" if spec.needs_registration else
                              "positions (if known)" if spec.patch_positions else "",
                     "options": ", ".join(f.name for f in dataclasses.fields(spec.options)) if spec.options else "",
                     "reference": spec.reference})
    return rows


def options_reference_markdown() -> str:
    """Every architecture's options as reference tables (``model.options.<name>.<key>``)."""
    parts = []
    for name, spec in ARCHITECTURES.items():
        if spec.options is not None:
            parts.append(f"### `{name}`\n\n{settings_reference(spec.options, f'model.options.{name}.')}")
    return "\n".join(parts)
