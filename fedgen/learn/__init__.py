"""Federated risk models: PyTorch models, local (DP-SGD) training at a site, export and scoring."""
