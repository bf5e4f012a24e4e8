"""Case-level statistics and their figures: metrics with bootstrap CIs, calibration, run plots.

Pure functions of labels and probabilities (numpy, scikit-learn, matplotlib): low in the flow, so the trainer,
evaluation, analysis and experiments all share them.
"""
