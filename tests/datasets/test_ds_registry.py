"""The registry entry point and the import-weight promise made to the device SDK."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megace.datasets import available, load_dataset, register


def test_registry_lists_the_tasks_and_rejects_unknown_names() -> None:
    assert {"basicmotions", "digits-av"} <= set(available())
    with pytest.raises(KeyError, match="unknown dataset"):
        load_dataset("no-such-dataset")
    with pytest.raises(ValueError):
        register("basicmotions", "somewhere.else:load")


def test_max_samples_caps_train_and_test_together() -> None:
    train, test = load_dataset("basicmotions", seed=0, max_samples=24)
    assert len(train) + len(test) == 24
    assert len(test) == 12  # the official split is 40/40
    assert (train.class_counts() >= 2).all() and (test.class_counts() >= 2).all()


def test_import_is_numpy_only() -> None:
    code = (
        "import sys, json, megace.datasets\n"
        "print(json.dumps(sorted(m for m in ('torch', 'sklearn', 'sktime', 'scipy', 'pandas') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
