"""Infer: one series from its files to a label map: volume loading, the model's prediction, left/right."""
