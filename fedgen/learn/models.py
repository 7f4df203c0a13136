"""The risk models fedgen trains: logistic/linear regression and a small MLP, as flat parameter vectors.

A model travels between aggregator and sites as one float64 vector of its parameters (in the
module's ``parameters()`` order), so FedAvg is a weighted mean of vectors and the site pipeline
can check one declared array.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KINDS = ("logistic", "mlp")
MAX_HIDDEN = 256


def build(kind: str, n_features: int, *, hidden: int = 16) -> Any:
    """A torch module mapping (batch, n_features) to (batch,) logits (binary) or predictions."""
    import torch

    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 1 <= int(n_features) <= 100_000:
        raise ValueError("a model needs 1..100000 features")
    if kind == "logistic":
        net = torch.nn.Linear(int(n_features), 1)
    else:
        if not 1 <= int(hidden) <= MAX_HIDDEN:
            raise ValueError(f"model hidden size must be in 1..{MAX_HIDDEN}")
        net = torch.nn.Sequential(torch.nn.Linear(int(n_features), int(hidden)), torch.nn.ReLU(), torch.nn.Linear(int(hidden), 1))
    return net.double()


def n_parameters(kind: str, n_features: int, *, hidden: int = 16) -> int:
    if kind == "logistic":
        return int(n_features) + 1
    return int(n_features) * int(hidden) + int(hidden) + int(hidden) + 1


def get_flat(net: Any) -> np.ndarray:
    return np.concatenate([p.detach().cpu().numpy().ravel() for p in net.parameters()]).astype(np.float64)


def set_flat(net: Any, flat: np.ndarray) -> None:
    import torch

    flat = np.asarray(flat, dtype=np.float64)
    total = sum(p.numel() for p in net.parameters())
    if flat.shape != (total,):
        raise ValueError(f"model weights must be a vector of {total} numbers")
    if not np.all(np.isfinite(flat)):
        raise ValueError("model weights must be finite")
    at = 0
    with torch.no_grad():
        for p in net.parameters():
            n = p.numel()
            p.copy_(torch.from_numpy(flat[at : at + n].reshape(tuple(p.shape))))
            at += n


def initial_weights(kind: str, n_features: int, *, hidden: int = 16, seed: int = 0) -> np.ndarray:
    """Starting weights (zeros for logistic; a seeded small random start for the MLP)."""
    if kind == "logistic":
        return np.zeros(n_parameters(kind, n_features))
    import torch

    torch.manual_seed(int(seed))
    return get_flat(build(kind, n_features, hidden=hidden))


def predict(kind: str, flat: np.ndarray, X: np.ndarray, *, hidden: int = 16, binary: bool = True) -> np.ndarray:
    """Predictions for rows of X: probabilities for a binary trait, values for a quantitative one."""
    import torch

    net = build(kind, X.shape[1], hidden=hidden)
    set_flat(net, flat)
    with torch.no_grad():
        out = net(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))).squeeze(-1).numpy()
    return 1.0 / (1.0 + np.exp(-out)) if binary else out
