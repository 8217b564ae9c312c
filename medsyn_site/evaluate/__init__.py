"""The central utility evaluator: nnU-Net v2 trained on real, synthetic, real + synthetic and real +
targeted synthetic data (arXiv 2410.12542), several seeds each, compared on the real test set."""
