"""``stainmil view``: a local web app showing a run's cases, slides and attention at full resolution, the stains of
a case side by side and linked through their registration. The top layer: it reads run folders, never the reverse."""
