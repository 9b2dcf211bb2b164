"""Datasets: the manifest every stage reads, the adapters that build it, image/mask IO."""
