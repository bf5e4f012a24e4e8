"""Whole-slide images in: reading (OpenSlide), tissue masks, patch grids at a physical scale, and
coordinates saved in CLAM/TRIDENT's HDF5 layout. Below ``features/``: the store reads coordinates,
never the reverse."""
