"""The models: one interface (:mod:`stainmil.model.base`), one input (:mod:`stainmil.model.batch`), one output
(:mod:`stainmil.model.output`) and a registry of architectures (:mod:`stainmil.model.registry`).

Importing the package registers the built-in architectures (each registers itself where it is defined), in
the order ``stainmil models`` lists them. Nothing here reads files or imports pandas, h5py or OpenSlide.
"""

# registration order is the listing order (not alphabetical)
from stainmil.model import hierarchical, aligned  # noqa: F401, I001
from stainmil.model.baselines import abmil, clam, dsmil, dtfd, transmil, pooling  # noqa: F401
from stainmil.model.multistain import late_fusion, mustang, biox_cpath, cross_attention  # noqa: F401
