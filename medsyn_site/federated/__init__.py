"""Federated training with Flower: the same trainer as ``medsyn train``, in rounds across sites."""
