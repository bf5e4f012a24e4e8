"""How extraction runs on this machine: batch size, decode workers and arithmetic precision, from the config
where it says so and from the device, the cores and the encoder's model card where it leaves them to stainmil
(``features.batch_size: 0``, ``features.num_workers: -1``, ``features.precision: auto``) — so neither a laptop
nor a 16-core GPU node needs tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stainmil.config import FeaturesConfig
from stainmil.cores import available_cores
from stainmil.features.encoders import ENCODERS

GPU_BATCH, CPU_BATCH = 256, 32
MAX_GPU_WORKERS, MAX_CPU_WORKERS = 16, 4
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExtractionPlan:
    batch_size: int
    workers: int
    precision: str  # fp32 | fp16 | bf16: the autocast dtype of the encoder's forward

    @property
    def autocast(self) -> torch.dtype | None:
        return DTYPES[self.precision]

    def describe(self) -> str:
        return f"batch {self.batch_size}, {self.workers} decode workers, {self.precision}"


def extraction_plan(f: FeaturesConfig, device: torch.device, cores: int | None = None) -> ExtractionPlan:
    """The plan for ``f`` on ``device``: the config's numbers where set, else sized to the device."""
    cores = cores or available_cores()
    gpu = device.type == "cuda"
    batch = f.batch_size if f.batch_size > 0 else (GPU_BATCH if gpu else CPU_BATCH)
    if f.num_workers >= 0:
        workers = f.num_workers
    elif gpu:  # decoding is the whole CPU's job; one core stays with the main process (collate, copies, store)
        workers = max(1, min(MAX_GPU_WORKERS, cores - 1))
    else:  # the encoder runs on the same cores: decoders get half of them
        workers = max(1, min(MAX_CPU_WORKERS, cores // 2))
    if not gpu:
        precision = "fp32"  # CPU autocast to half precision is slower than fp32 and changes features
    elif f.precision != "auto":
        precision = f.precision
    else:
        spec = ENCODERS.get(f.backbone)
        precision = spec.precision if spec is not None else "fp32"
    return ExtractionPlan(batch, workers, precision)
