"""Every runnable example in a public docstring runs and prints what it says (doctest)."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["moewidgets.config", "moewidgets.nn.experts", "moewidgets.nn.routers", "moewidgets.nn.layer",
           "moewidgets.models", "moewidgets.balance", "moewidgets.data", "moewidgets.train", "moewidgets.trace",
           "moewidgets.sweep", "moewidgets.reproduce", "moewidgets.reproduce.common", "moewidgets.geometry.jacobians", "moewidgets.geometry.spectra",
           "moewidgets.geometry.pca", "moewidgets.geometry.alignment", "moewidgets.geometry.probes",
           "moewidgets.geometry.mpi", "moewidgets.geometry.coupling",
           "moewidgets.geometry.subspaces", "moewidgets.geometry.asymmetry", "moewidgets.reproduce.chapter2", "moewidgets.reproduce.chapter3", "moewidgets.static",
           "moewidgets.wikitext", "moewidgets.lm", "moewidgets.ledger", "moewidgets.multiseed",
           "moewidgets.hf.blocks", "moewidgets.hf.capture", "moewidgets.hf.metrics", "moewidgets.hf.probing"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name.startswith("moewidgets.hf"):
        pytest.importorskip("transformers")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
