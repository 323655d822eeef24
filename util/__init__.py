"""Small single-purpose helpers for training, evaluation and the demos."""
