"""The adapter naming rules and the B rescaling in ``megace_common.lora``, with expectations written out by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.wire import modality_of as wire_modality_of
from megace_common.lora import (
    PEFT_PREFIX,
    add_peft_prefix,
    b_factor,
    is_lora_b,
    lora_a,
    lora_b,
    lora_scaling,
    modality_of,
    rescale_b,
    split_lora,
    strip_peft_prefix,
)

ROOT = Path(__file__).resolve().parents[1]


def test_peft_prefix_is_what_peft_puts_before_the_wrapped_models_names() -> None:
    assert PEFT_PREFIX == "base_model.model."
    assert add_peft_prefix("head.weight") == "base_model.model.head.weight"
    assert strip_peft_prefix("base_model.model.head.weight") == "head.weight"


def test_strip_leaves_names_without_the_prefix_alone() -> None:
    assert strip_peft_prefix("head.weight") == "head.weight"
    assert strip_peft_prefix("cls_token") == "cls_token"
    assert strip_peft_prefix("x.base_model.model.head.weight") == "x.base_model.model.head.weight"  # only leading
    assert strip_peft_prefix("base_model.model.base_model.model.a") == "base_model.model.a"  # once


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("base_model.model.backbone.encoder.layer.0.attention.self.query.lora_A.weight",
         ("base_model.model.backbone.encoder.layer.0.attention.self.query", "A")),
        ("base_model.model.modality_proj.audio.lora_B.weight", ("base_model.model.modality_proj.audio", "B")),
        ("q.lora_A.default.weight", ("q", "A")),  # state_dict keeps the adapter name
        ("m.lora_B.default.weight", ("m", "B")),
        ("base_model.model.head.weight", None),
        ("m.lora_A.bias", None),
        ("m.lora_C.weight", None),
        ("m.lora_A.a.b.weight", None),  # at most one adapter-name segment
        ("lora_A.weight", None),  # a factor always belongs to a module
        ("m.lora_a.weight", None),
        ("m.lora_B.weight.x", None),
    ],
)
def test_split_lora(name: str, parts: tuple[str, str] | None) -> None:
    assert split_lora(name) == parts


def test_factor_names_and_is_lora_b() -> None:
    assert lora_a("enc.q") == "enc.q.lora_A.weight"
    assert lora_b("enc.q") == "enc.q.lora_B.weight"
    assert split_lora(lora_a("enc.q")) == ("enc.q", "A")
    assert split_lora(lora_b("enc.q")) == ("enc.q", "B")
    assert is_lora_b("enc.q.lora_B.weight")
    assert is_lora_b("enc.q.lora_B.default.weight")
    assert not is_lora_b("enc.q.lora_A.weight")
    assert not is_lora_b("base_model.model.head.weight")
    assert not is_lora_b("enc.lora_B.bias")


@pytest.mark.parametrize(
    ("name", "modality"),
    [
        ("base_model.model.modality_proj.audio", "audio"),  # a module name, as peft's named_modules gives it
        ("base_model.model.modality_proj.audio.lora_A.weight", "audio"),
        ("base_model.model.modality_proj.image.lora_B.default.weight", "image"),
        ("modality_proj.image", "image"),
        ("modality_proj.image.", "image"),
        ("enc.modality_proj.depth_2.fc.weight", "depth_2"),
        ("base_model.model.backbone.encoder.layer.0.attention.self.query", None),
        ("base_model.model.backbone.encoder.layer.0.attention.self.query.lora_A.weight", None),
        ("xmodality_proj.audio.lora_A.weight", None),  # the tag starts a name segment
        ("modality_proj.Audio.lora_A.weight", None),  # lower-case modality names only
        ("modality_proj", None),
    ],
)
def test_modality_of_tensor_and_module_names(name: str, modality: str | None) -> None:
    assert modality_of(name) == modality


def test_modality_of_agrees_with_the_bus_contract_on_tensor_names() -> None:
    for name in ("a.modality_proj.audio.lora_A.weight", "modality_proj.x9.lora_B.weight", "a.b.lora_B.weight",
                 "a.modality_proj.audio_lora_A.weight"):
        assert modality_of(name) == wire_modality_of(name)
    # the bus contract alone does not read a bare module name; the module-name rule is this module's addition
    assert wire_modality_of("base_model.model.modality_proj.audio") is None
    assert modality_of("base_model.model.modality_proj.audio") == "audio"


def test_lora_scaling_is_alpha_over_rank() -> None:
    assert lora_scaling(16, 8) == 2.0
    assert lora_scaling(32.0, 8) == 4.0
    assert lora_scaling(8, 16) == 0.5
    assert lora_scaling(1, 4) == 0.25
    assert isinstance(lora_scaling(16, 8), float)


def test_b_factor_is_sender_over_receiver() -> None:
    assert b_factor(4.0, 2.0) == 2.0  # made at alpha/r 4 (e.g. 32/8), received at 2 (16/8)
    assert b_factor(1.0, 2.0) == 0.5  # the cloud's global (scaling 1) to an edge at 16/8
    assert b_factor(2.0, 1.0) == 2.0  # an edge's seeded adapter folded to the global's scaling 1
    assert b_factor(3.0, 3.0) == 1.0


def test_rescale_b_on_numpy_arrays() -> None:
    b = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)  # (out=3, r=2)
    got = rescale_b(b, 4.0, 2.0)
    np.testing.assert_array_equal(got, np.array([[2.0, 4.0], [6.0, 8.0], [10.0, 12.0]], dtype=np.float32))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(b, np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32))  # untouched
    np.testing.assert_array_equal(rescale_b(b, 1.0, 2.0), np.array([[0.5, 1.0], [1.5, 2.0], [2.5, 3.0]]))


def test_rescale_b_on_torch_tensors() -> None:
    b = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64)
    got = rescale_b(b, 1.0, 4.0)
    assert torch.equal(got, torch.tensor([[0.25, -0.5], [0.125, 1.0]], dtype=torch.float64))
    assert got is not b and got.dtype == torch.float64


def test_rescale_b_from_the_global_is_one_division_by_the_receivers_scaling() -> None:
    b = np.array([1.0, 2.0, 0.1])
    np.testing.assert_array_equal(rescale_b(b, 1.0, 3.0), np.array([1.0 / 3.0, 2.0 / 3.0, 0.1 / 3.0]))
    np.testing.assert_array_equal(rescale_b(b, 1.0, 1.0), b)
    b32 = np.array([0.1, 0.7], dtype=np.float32)
    got = rescale_b(b32, 1.0, 6.0 / 7.0)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, b32 / np.float32(6.0 / 7.0))


def test_rescaled_b_keeps_the_effective_update() -> None:
    a = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # (r=2, in=3)
    b = np.array([[1.0, 2.0], [3.0, 4.0]])  # (out=2, r=2)
    sent, own = lora_scaling(32, 8), lora_scaling(16, 8)  # 4 and 2
    want = np.array([[4.0, 8.0, -0.0], [12.0, 16.0, 8.0]])  # 4 · B @ A, by hand
    np.testing.assert_array_equal(sent * b @ a, want)
    np.testing.assert_array_equal(own * rescale_b(b, sent, own) @ a, want)


def test_the_module_does_not_import_torch() -> None:
    code = "import sys, megace_common.lora; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT).returncode == 0
