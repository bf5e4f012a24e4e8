"""Online (end-to-end) mode: the backbone runs on the patch images inside every training step.

``features.mode: online`` replaces the feature store as the source of patch embeddings; the model
head, the training loop and the run folder stay the same. Training batches get the old pipeline's
augmentations (random resized crop, flips/rotations, HED and brightness/contrast jitter), drawn from
the trainer's seeded generator, so a resumed run repeats them exactly.

``features.trainable_blocks: n`` fine-tunes the last n blocks — dense blocks of a CNN, transformer blocks
of a ViT, with the final norm — (their own learning rate,
``features.backbone_lr``); the frozen stem runs without autograd. BatchNorm layers keep their
ImageNet running statistics (eval mode), as is usual when batches are one case's patches.
``features.gradient_checkpointing`` recomputes the tail's activations in the backward pass; on a
GPU the backbone runs under bf16 autocast.

When training ends, the best checkpoint's backbone extracts every patch once into the run's own
store (``<run>/features``), so evaluation, attention analysis and the report run unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from stainmil.config import Config, FeaturesConfig
from stainmil.errors import ConfigError, TrainingError
from stainmil.features.augment import forward_images, train_augment
from stainmil.features.backbones import Backbone, build_backbone, state_dict_hash
from stainmil.features.encoder_modules import EncoderModule
from stainmil.features.encoders import preprocessing
from stainmil.features.plan import extraction_plan
from stainmil.slides.reader import SlideHandles, read_patch


def split_backbone(module: nn.Module, trainable_blocks: int) -> tuple[nn.Module, nn.Module | None, list[nn.Module]]:
    """(frozen stem, trainable tail or None, modules trained with the tail) of a backbone.

    Fine-tuning needs an :class:`~stainmil.features.encoder_modules.EncoderModule` (every registered encoder):
    the tail is its last ``trainable_blocks`` blocks, and its final norm trains with them.
    """
    if trainable_blocks == 0:
        return module, None, []
    if not isinstance(module, EncoderModule):
        raise ConfigError(f"features.trainable_blocks={trainable_blocks} needs a registered encoder; "
                          f"{type(module).__name__} (a file: encoder) has no blocks — set features.trainable_blocks=0.")
    if trainable_blocks > module.block_count:
        raise ConfigError(f"features.trainable_blocks={trainable_blocks} but this encoder has {module.block_count} "
                          f"blocks; choose 0..{module.block_count}.")
    stages = module.stages()
    start = module.tail_start(trainable_blocks)
    return nn.Sequential(*stages[:start]), nn.Sequential(*stages[start:]), [*stages[start:], *module.finish_modules()]


class OnlineEncoder:
    """Images -> patch features (P, D) on ``device``, with training augmentations and a trainable tail."""

    def __init__(self, f: FeaturesConfig, device: torch.device, backbone: Backbone | None = None) -> None:
        self.config, self.device = f, device
        self.mean, self.std = preprocessing(f.backbone, f.mean, f.std)
        self.backbone = backbone or build_backbone(f)
        self.module = self.backbone.module.to(device).to(memory_format=torch.channels_last)
        self.out_dim = self.backbone.out_dim
        self.stem, self.tail, trained = split_backbone(self.module, f.trainable_blocks)
        names = {id(m): name for name, m in self.module.named_modules()}
        trained = [getattr(m, "wrapped", m) for m in trained]  # stage adapters -> the library's own layers
        prefixes = tuple(f"{names[id(m)]}." for m in trained)
        self.tail_keys = [k for k in self.module.state_dict() if k.startswith(prefixes)]
        self.tail_parameters = [p for name, p in self.module.named_parameters() if name.startswith(prefixes)]
        for p in self.tail_parameters:
            p.requires_grad_(True)
        self.plan = extraction_plan(f, device)
        # a fine-tuned tail trains in bf16 (fp16 gradients would need a GradScaler); a frozen encoder as its card says
        self.autocast = torch.bfloat16 if f.trainable_blocks and self.plan.precision == "fp16" else self.plan.autocast
        self.readers = ThreadPoolExecutor(max_workers=max(1, self.plan.workers))  # PIL decodes without the GIL
        self.slides = SlideHandles()  # the slides the readers share (slide-route cohorts)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.tail_parameters)

    def read(self, paths: Sequence[str]) -> torch.Tensor:
        """uint8 images (P, 3, S, S) of patch files or slide regions, decoded by a thread pool."""
        size = self.config.image_size
        arrays = list(self.readers.map(lambda p: read_patch(p, size, self.slides), paths))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def encode(self, paths: Sequence[str], augment: bool, rng: np.random.Generator | None) -> torch.Tensor:
        """Features (P, D) float32 of the images at ``paths``; augmented with ``augment`` (needs ``rng``)."""
        f = self.config
        generator = None
        if augment and f.online_augment:
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        out = []
        batch = self.plan.batch_size
        for start in range(0, len(paths), batch):  # pixels of one batch in memory at a time
            x = self.read(paths[start:start + batch]).to(self.device, non_blocking=True).float().div_(255)
            if generator is not None:
                x = train_augment(x, generator, hed_strength=f.augment_hed)
            out.append(forward_images(self._forward, x, self.mean, self.std, self.autocast))
        return torch.cat(out)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> features (B, D); autograd only through the tail."""
        if self.tail is None:
            with torch.no_grad():
                return self.module(x)
        with torch.no_grad():
            maps = self.stem(x)
        grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        if grad and self.config.gradient_checkpointing:
            for layer in self.tail:
                maps = checkpoint(layer, maps, use_reentrant=False)
        else:
            maps = self.tail(maps)
        return self.module.finish(maps)

    def tail_state(self) -> dict[str, torch.Tensor]:
        """The fine-tuned part of the backbone's state dict (empty when frozen)."""
        state = self.module.state_dict()
        return {k: state[k].detach().cpu().clone() for k in self.tail_keys}

    def load_tail_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.tail_keys):

            raise TrainingError("the checkpoint's backbone tail does not match features.trainable_blocks of the "
                                "run's config; resume with the run's own config.yaml.")
        self.module.load_state_dict(state, strict=False)

    def as_backbone(self) -> Backbone:
        """The backbone as it is now (fine-tuned tail included), for extraction."""
        b = self.backbone
        return Backbone(b.name, self.module, b.out_dim, b.weights_id, state_dict_hash(self.module))


def backbone_from_checkpoint(state: dict, config: Config, device: torch.device) -> Backbone | None:
    """The fine-tuned backbone saved in a checkpoint (``state['backbone']``), or None when it has none."""
    if not state.get("backbone"):
        return None
    encoder = OnlineEncoder(config.features, device)
    encoder.load_tail_state(state["backbone"])
    return encoder.as_backbone()
