"""Datasets: real ones read from local paths (never downloaded) and the synthetic synthshapes benchmark."""
