"""Batches of cases drawn from the cohort's features (above the feature store, below the models)."""
