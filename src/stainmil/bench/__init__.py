"""Benchmarks that print figures (`stainmil bench`): the training epoch, the feed from the store, scale."""
