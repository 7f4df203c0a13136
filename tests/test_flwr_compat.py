"""Flower internals that fedgen's controls rebind: all present, and a missing one stops the node."""

from __future__ import annotations

import sys
import types

import pytest

from fedgen.federation import flwr_compat


def test_every_hook_exists_in_the_installed_flwr():
    for role in flwr_compat.HOOKS:
        assert flwr_compat.missing_hooks(role) == [], role


def test_a_missing_hook_refuses_to_start_and_names_it(monkeypatch):
    monkeypatch.setitem(flwr_compat.HOOKS, "supernode", (*flwr_compat.HOOKS["supernode"],
                                                         ("flwr.supernode.start_client_internal", "gone_in_next_flwr")))
    with pytest.raises(flwr_compat.FlowerIncompatible, match="flwr.supernode.start_client_internal.gone_in_next_flwr"):
        flwr_compat.require("supernode")
    from fedgen.federation import supernode

    monkeypatch.setattr(sys, "argv", ["fedgen-supernode", "--insecure", "--superlink", "127.0.0.1:1"])
    with pytest.raises(SystemExit, match="gone_in_next_flwr.*refusing to start"):
        supernode.main()


def test_rebind_refuses_an_attribute_flwr_does_not_have():
    mod = types.ModuleType("fake")
    mod.real = 1
    assert flwr_compat.rebind(mod, "real", 2) == 1 and mod.real == 2
    with pytest.raises(flwr_compat.FlowerIncompatible, match="fake.absent"):
        flwr_compat.rebind(mod, "absent", 3)
