"""The patch-encoder registry: what each encoder is, from its model card, without building it.

One :class:`EncoderSpec` per name. It states the architecture and its exact constructor kwargs in
the library that builds it (torchvision, timm or transformers), the input size, the normalisation,
how the embedding is pooled, the output dimension, the precision the authors run it in, where the
weights live and under which licence. ``stainmil backbones`` prints this table; the docs' encoder reference
is generated from it.

Building (and loading weights) is :mod:`stainmil.features.backbones`; the modules that turn each
architecture into ``(B, 3, H, W) -> (B, D)`` are in :mod:`stainmil.features.encoder_modules`.
New encoders plug in with :func:`register_encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stainmil.errors import ConfigError
from stainmil.tables import render_table

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
KAIKO_MEAN = (0.5, 0.5, 0.5)
KAIKO_STD = (0.5, 0.5, 0.5)

# kwargs that name timm layer classes are given as strings here (printable, hashable) and resolved at build time
SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}


@dataclass(frozen=True)
class EncoderSpec:
    """One registered encoder. ``pooling``: ``avgpool`` (CNN feature maps), ``cls`` (class token after the
    final norm) or ``cls+mean`` (class token concatenated with the mean of the patch tokens, registers excluded)."""

    name: str
    library: Literal["torchvision", "timm", "transformers"]
    architecture: str                 # torchvision / timm model name, or a transformers config class
    kwargs: dict = field(default_factory=dict)
    input_size: int = 224
    patch_size: int = 0               # ViT token size: the input side must be a multiple of it (0 = CNN)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: Literal["avgpool", "cls", "cls+mean"] = "cls"
    dim: int = 0                      # embedding dimension
    params_m: float = 0.0             # parameters of the embedding network (millions), as the model card gives
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    hub_id: str = ""                  # Hugging Face repo, or the torchvision weights URL
    licence: str = ""
    gated: bool = False               # needs accepted terms + a token on Hugging Face
    weights_file: str = "pytorch_model.bin"  # the file holding the state dict in the hub repo

    @property
    def weights_source(self) -> str:
        return "torchvision" if self.hub_id.startswith("https://") else "huggingface"


ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    ENCODERS[spec.name] = spec
    return spec


def encoder_spec(name: str) -> EncoderSpec:
    """The registered spec for ``name`` (one sentence naming the choices when unknown)."""
    if name not in ENCODERS:
        raise ConfigError(f"features.backbone '{name}' is not registered; choose one of {sorted(ENCODERS)} "
                          "(`stainmil backbones` lists them) or use file:/path/encoder.py:build.")
    return ENCODERS[name]


def _vit(name: str, architecture: str, hub_id: str, dim: int, params_m: float, licence: str, *,
         token: int, pooling: str = "cls", precision: str = "fp16", gated: bool = True,
         mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size: int = 224, weights_file: str = "pytorch_model.bin",
         **kwargs) -> EncoderSpec:
    kwargs = {"img_size": input_size, "num_classes": 0, "dynamic_img_size": True, **kwargs}
    return register_encoder(EncoderSpec(
        name, "timm", architecture, kwargs, input_size, token, mean, std, pooling, dim, params_m, precision,
        hub_id, licence, gated, weights_file))


register_encoder(EncoderSpec(
    "densenet121", "torchvision", "densenet121", {}, 224, 0, IMAGENET_MEAN, IMAGENET_STD, "avgpool", 1024, 7.98,
    "fp32", "https://download.pytorch.org/models/densenet121-a639ec97.pth", "BSD-3 (torchvision), ImageNet weights"))
register_encoder(EncoderSpec(
    "resnet50_trunc", "torchvision", "resnet50", {"truncate_after": "layer3"}, 224, 0, IMAGENET_MEAN, IMAGENET_STD,
    "avgpool", 1024, 8.54, "fp32", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "BSD-3 (torchvision), ImageNet weights; CLAM's default encoder"))
_vit("uni_v1", "vit_large_patch16_224", "MahmoodLab/UNI", 1024, 303.4, "CC-BY-NC-ND-4.0 (academic)",
     token=16, patch_size=16, init_values=1e-5)
_vit("uni_v2", "vit_giant_patch14_224", "MahmoodLab/UNI2-h", 1536, 681.4, "CC-BY-NC-ND-4.0 (academic)",
     token=14, precision="bf16", patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
     mlp_ratio=2.66667 * 2, no_embed_class=True, reg_tokens=8, **SWIGLU)
_vit("virchow", "vit_huge_patch14_224", "paige-ai/Virchow", 2560, 631.2, "Apache-2.0", token=14,
     pooling="cls+mean", init_values=1e-5, mlp_ratio=5.3375, global_pool="", **SWIGLU)
_vit("virchow2", "vit_huge_patch14_224", "paige-ai/Virchow2", 2560, 631.2, "CC-BY-NC-ND-4.0",
     token=14, pooling="cls+mean", init_values=1e-5, mlp_ratio=5.3375, global_pool="", reg_tokens=4, **SWIGLU)
_vit("hoptimus0", "vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-0", 1536, 1134.8, "Apache-2.0",
     token=14, gated=False, mean=BIOPTIMUS_MEAN, std=BIOPTIMUS_STD, init_values=1e-5, global_pool="token")
_vit("hoptimus1", "vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-1", 1536, 1134.8,
     "CC-BY-NC-ND-4.0", token=14, mean=BIOPTIMUS_MEAN, std=BIOPTIMUS_STD, init_values=1e-5,
     global_pool="token")
_vit("h0_mini", "vit_base_patch14_reg4_dinov2", "bioptimus/H0-mini", 768, 86.1, "CC-BY-NC-ND-4.0",
     token=14, mean=BIOPTIMUS_MEAN, std=BIOPTIMUS_STD, mlp_ratio=5.33334, **SWIGLU)
_vit("gigapath", "vit_giant_patch14_dinov2", "prov-gigapath/prov-gigapath", 1536, 1134.8, "Apache-2.0",
     token=16, patch_size=16, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334,
     init_values=1e-5)
_vit("lunit_vits8", "vit_small_patch8_224", "1aurent/vit_small_patch8_224.lunit_dino", 384, 21.7,
     "non-commercial (Lunit)", token=8, precision="fp32", gated=False, mean=LUNIT_MEAN, std=LUNIT_STD,
     weights_file="model.safetensors")


def _register_kaiko() -> None:
    """kaiko.ai's ViT-S/B at 16 and 8 px tokens (one registration per size; no names left at module level)."""
    for size, arch, dim, params, patch in (("vits16", "vit_small_patch16_224", 384, 21.7, 16),
                                           ("vits8", "vit_small_patch8_224", 384, 21.7, 8),
                                           ("vitb16", "vit_base_patch16_224", 768, 85.8, 16),
                                           ("vitb8", "vit_base_patch8_224", 768, 85.8, 8)):
        _vit(f"kaiko_{size}", arch, f"1aurent/{arch}.kaiko_ai_towards_large_pathology_fms", dim, params,
             "Apache-2.0", token=patch, precision="fp32", gated=False, mean=KAIKO_MEAN, std=KAIKO_STD,
             weights_file="model.safetensors")


_register_kaiko()
_vit("kaiko_vitl14", "vit_large_patch14_reg4_dinov2", "1aurent/vit_large_patch14_reg4_dinov2"
     ".kaiko_ai_towards_large_pathology_fms", 1024, 304.4, "Apache-2.0", token=14, precision="fp32",
     gated=False, mean=KAIKO_MEAN, std=KAIKO_STD, weights_file="model.safetensors")
register_encoder(EncoderSpec(
    "phikon_v2", "transformers", "Dinov2Config",
    {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
     "patch_size": 16, "image_size": 224, "layerscale_value": 1e-5, "layer_norm_eps": 1e-6},
    224, 16, IMAGENET_MEAN, IMAGENET_STD, "cls", 1024, 303.2, "fp32", "owkin/phikon-v2",
    "Owkin non-commercial", False, "model.safetensors"))


def resolve_kwargs(spec: EncoderSpec, image_size: int) -> dict:
    """The constructor kwargs with layer names resolved to classes and the input size set to ``image_size``."""
    import importlib

    out = {}
    for key, value in spec.kwargs.items():
        if key in ("mlp_layer", "act_layer"):
            module, _, attr = value.rpartition(".")
            out[key] = getattr(importlib.import_module(module), attr)
        else:
            out[key] = value
    if spec.library == "timm":
        out["img_size"] = image_size
    return out


def check_image_size(spec: EncoderSpec, image_size: int) -> None:
    """A ViT's input side must be a multiple of its token size (positional embeddings are interpolated)."""
    if spec.patch_size and image_size % spec.patch_size:
        lower = spec.patch_size * max(1, image_size // spec.patch_size)
        raise ConfigError(f"features.image_size={image_size} is not a multiple of {spec.name}'s {spec.patch_size}-px "
                          f"tokens; set it to {lower} or {lower + spec.patch_size} (native: {spec.input_size}).")


def preprocessing(backbone: str, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    """Normalisation actually used: the config's mean/std when given, else the encoder's own (ImageNet for
    ``file:`` encoders)."""
    spec = ENCODERS.get(backbone)
    default_mean, default_std = (spec.mean, spec.std) if spec else (IMAGENET_MEAN, IMAGENET_STD)
    return list(mean) if mean else list(default_mean), list(std) if std else list(default_std)


def encoder_table() -> list[dict]:
    """One row per registered encoder (for ``stainmil backbones`` and the docs)."""
    rows = []
    for spec in ENCODERS.values():
        kwargs = {k: (v.rsplit(".", 1)[-1] if isinstance(v, str) and "." in v else v) for k, v in spec.kwargs.items()}
        kwargs = {k: v for k, v in kwargs.items() if k not in ("img_size", "num_classes", "dynamic_img_size")}
        rows.append({"name": spec.name, "library": spec.library, "architecture": spec.architecture,
                     "kwargs": ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v!r}" if v == "" else
                                         f"{k}={v}" for k, v in kwargs.items()) or "-",
                     "input": spec.input_size, "mean": "imagenet" if spec.mean == IMAGENET_MEAN else
                     "/".join(f"{m:.3g}" for m in spec.mean), "std": "imagenet" if spec.std == IMAGENET_STD else
                     "/".join(f"{s:.3g}" for s in spec.std), "pooling": spec.pooling, "dim": spec.dim,
                     "params_M": spec.params_m, "precision": spec.precision,
                     "weights": spec.hub_id.rsplit("/", 1)[-1] if spec.weights_source == "torchvision"
                     else f"hf:{spec.hub_id}", "licence": spec.licence + ("; gated" if spec.gated else "")})
    return rows


def encoder_table_markdown() -> str:
    return render_table(encoder_table(), fmt="markdown")
