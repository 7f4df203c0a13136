"""One site's local training round: DP-SGD with Opacus (or plain SGD where the site allows it).

DP-SGD (Abadi et al. 2016) as Opacus implements it: every step takes a Poisson sample of the
site's people (each independently with probability ``sample_rate``), clips each person's
gradient to L2 norm ``clip`` and adds Gaussian noise of standard deviation
``noise_multiplier × clip`` to their sum. The privacy cost of ``steps`` such steps is the event
``{"type": "dpsgd", "sample_rate": q, "noise_multiplier": z, "count": steps}``, which the site's
ledger composes with everything it has released before (the same RDP accounting as Opacus').
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedgen.learn import models

log = logging.getLogger(__name__)

MAX_EPOCHS = 100


@dataclass(frozen=True)
class TrainSettings:
    """A round's training settings (request parameters, validated)."""

    epochs: int
    sample_rate: float
    lr: float
    clip: float
    noise_multiplier: float | None  # None: no DP (plain SGD, full gradients)

    @property
    def steps(self) -> int:
        """Optimiser steps of one round: ``epochs`` passes of 1/q Poisson batches."""
        return int(self.epochs) * steps_per_epoch(self.sample_rate)

    @classmethod
    def parse(cls, p: Any, *, dp: bool) -> "TrainSettings":
        if not isinstance(p, dict):
            raise ValueError("'train' must be a mapping")

        def num(key: str, lo: float, hi: float) -> float:
            v = p.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or not lo <= float(v) <= hi:
                raise ValueError(f"train.{key} must be a number in [{lo:g}, {hi:g}]")
            return float(v)

        epochs = int(num("epochs", 1, MAX_EPOCHS))
        q = num("sample_rate", 1e-4, 1.0)
        lr = num("lr", 1e-6, 100.0)
        if dp:
            return cls(epochs, q, lr, num("clip", 1e-6, 1e6), num("noise_multiplier", 0.05, 1e4))
        return cls(epochs, q, lr, float("inf"), None)


def steps_per_epoch(sample_rate: float) -> int:
    return max(1, int(1.0 / float(sample_rate)))  # as Opacus' DPDataLoader: int(1/q) batches per epoch


def dpsgd_event(settings: TrainSettings) -> dict[str, Any]:
    return {"type": "dpsgd", "sample_rate": float(settings.sample_rate), "noise_multiplier": float(settings.noise_multiplier),
            "count": settings.steps}


def local_round(
    X: np.ndarray, y: np.ndarray, weights: np.ndarray, *, kind: str, hidden: int, binary: bool, settings: TrainSettings,
    seed: int | None = None,
) -> np.ndarray:
    """Train from ``weights`` on (X, y) for one round; return the new flat weights.

    With ``settings.noise_multiplier`` set, Opacus DP-SGD (Poisson sampling, per-sample
    clipping, Gaussian noise); otherwise plain SGD on Poisson batches (on the full data when
    ``sample_rate`` is 1, which makes one round one gradient step).
    """
    import torch

    seed = int.from_bytes(os.urandom(8), "little") % (2**63) if seed is None else int(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = models.build(kind, X.shape[1], hidden=hidden)
    models.set_flat(net, weights)
    Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))
    loss_fn = torch.nn.BCEWithLogitsLoss() if binary else torch.nn.MSELoss()
    opt = torch.optim.SGD(net.parameters(), lr=settings.lr)
    data = torch.utils.data.TensorDataset(Xt, yt)
    n = len(data)
    if settings.noise_multiplier is None:
        for _ in range(settings.steps):
            if settings.sample_rate >= 1.0:
                xb, yb = Xt, yt
            else:
                take = torch.rand(n, generator=gen) < settings.sample_rate
                if not bool(take.any()):
                    continue
                xb, yb = Xt[take], yt[take]
            opt.zero_grad()
            loss_fn(net(xb).squeeze(-1), yb).backward()
            opt.step()
        return models.get_flat(net)
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    loader = DPDataLoader(data, sample_rate=settings.sample_rate, generator=gen)
    engine = PrivacyEngine(accountant="rdp")
    net, opt, loader = engine.make_private(
        module=net, optimizer=opt, data_loader=loader, noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.clip, poisson_sampling=False, noise_generator=gen,
    )
    steps = 0
    for _ in range(settings.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            if len(xb):
                loss_fn(net(xb).squeeze(-1), yb).backward()
            else:  # an empty Poisson batch: the step still adds noise (and is accounted)
                for p in net.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            opt.step()
            steps += 1
    if steps != settings.steps:
        raise RuntimeError(f"DP-SGD ran {steps} steps, {settings.steps} were accounted")
    return models.get_flat(net._module if hasattr(net, "_module") else net)
