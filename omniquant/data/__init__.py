"""Calibration and evaluation data: manifests, media readers, processing, batches."""
