"""Shared / personal split, applying global adapters, and the peft-format round trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from edge_agent.training.toy_task import ToyTask, toy_config
from megace_model.adapters import (
    apply_global,
    build_base_model,
    build_edge_model,
    is_personal,
    load_personal,
    load_shared,
    parameter_counts,
    personal_state,
    shared_fraction,
    shared_state,
)
from megace_model.batch import collate
from megace_model.errors import AdapterMismatchError, BaseMismatchError, NonFiniteAdapterError
from megace_model.export import META_FILE, export_shared, import_shared

torch.set_num_threads(1)


def perturbed(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A plausible 'global' adapter: same names/shapes, different values."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def logits_of(model: PeftModel, batch_inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch_inputs).logits


@pytest.fixture
def setup() -> tuple:
    config = toy_config()
    model = build_edge_model(config)
    inputs = collate(ToyTask(config).samples(6), config).model_inputs()
    return config, model, inputs


def test_shared_and_personal_are_disjoint_and_tagged(setup: tuple) -> None:
    config, model, _ = setup
    shared, personal = shared_state(model), personal_state(model)
    assert shared and personal
    assert all(".lora_A." in k or ".lora_B." in k for k in shared)
    for name in config.modality_names:
        tagged = [k for k in shared if f".modality_proj.{name}." in k]
        assert len(tagged) == 2, tagged  # lora_A and lora_B of that modality
    backbone = [k for k in shared if ".backbone.encoder." in k]
    assert backbone and all(".query." in k or ".value." in k for k in backbone)
    for key in shared:
        for part in ("head", "cross_modal", "cls_token", "modality_embed", "position_embed"):
            assert f".{part}" not in key
    assert {k.split(".")[0] for k in personal} == {
        "head",
        "cross_modal",
        "cls_token",
        "modality_embed",
        "position_embed",
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(shared) + len(personal)  # nothing else trains
    assert shared_state(model, torch.float16)[next(iter(shared))].dtype == torch.float16


def test_every_edge_starts_from_the_same_shared_adapter() -> None:
    a, b = shared_state(build_edge_model(toy_config())), shared_state(build_edge_model(toy_config()))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_apply_global_changes_outputs_but_keeps_personal(setup: tuple) -> None:
    _, model, inputs = setup
    before_logits = logits_of(model, inputs)
    before_personal = personal_state(model)
    glob = perturbed(shared_state(model))
    apply_global(model, {k: v.to(torch.float16).numpy() for k, v in glob.items()})  # wire form: fp16 numpy
    after = shared_state(model)
    assert all(torch.allclose(after[k], glob[k], atol=1e-2) for k in glob)
    assert not torch.allclose(before_logits, logits_of(model, inputs), atol=1e-4)
    personal = personal_state(model)
    assert all(torch.equal(personal[k], before_personal[k]) for k in before_personal)


def test_bad_global_raises_typed_error_and_leaves_model_unchanged(setup: tuple) -> None:
    _, model, inputs = setup
    ref_shared, ref_logits = shared_state(model), logits_of(model, inputs)
    good = perturbed(ref_shared)
    key = next(iter(good))
    wrong_shape = {**good, key: torch.zeros(3, 3)}
    with_nan = {**good, key: torch.full_like(good[key], float("nan"))}
    unknown = {**good, "base_model.model.head.1.weight": torch.zeros(4, 128)}
    missing = {k: v for k, v in good.items() if k != key}
    cases = [
        (wrong_shape, AdapterMismatchError),
        (with_nan, NonFiniteAdapterError),
        (unknown, AdapterMismatchError),
        (missing, AdapterMismatchError),
    ]
    for tensors, error in cases:
        with pytest.raises(error):
            apply_global(model, tensors)
        now = shared_state(model)
        assert all(torch.equal(now[k], ref_shared[k]) for k in ref_shared)
    assert torch.equal(logits_of(model, inputs), ref_logits)
    assert issubclass(AdapterMismatchError, ValueError)


def test_partial_load_only_touches_given_modality(setup: tuple) -> None:
    _, model, _ = setup
    ref = shared_state(model)
    only_imu = {k: v + 1.0 for k, v in ref.items() if ".modality_proj.imu." in k}
    load_shared(model, only_imu, strict=False)
    now = shared_state(model)
    for k in ref:
        assert torch.equal(now[k], only_imu[k]) if k in only_imu else torch.equal(now[k], ref[k])


def test_peft_format_round_trip(setup: tuple, tmp_path: Path) -> None:
    config, model, inputs = setup
    apply_global(model, perturbed(shared_state(model), seed=3))
    export_shared(model, tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == config.lora_r
    loaded = PeftModel.from_pretrained(build_base_model(config), str(tmp_path))
    want, got = shared_state(model), shared_state(loaded)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # Same frozen base + same shared part + same seeded personal init => same outputs.
    assert torch.allclose(logits_of(loaded, inputs), logits_of(model, inputs), atol=1e-5)
    fresh = build_edge_model(config)
    import_shared(fresh, tmp_path)
    assert torch.allclose(logits_of(fresh, inputs), logits_of(model, inputs), atol=1e-5)


def test_import_rejects_adapter_for_other_base(setup: tuple, tmp_path: Path) -> None:
    _, model, _ = setup
    export_shared(model, tmp_path)
    other = build_edge_model(toy_config(seed=5))
    before = shared_state(other)
    with pytest.raises(BaseMismatchError):
        import_shared(other, tmp_path)
    assert all(torch.equal(shared_state(other)[k], before[k]) for k in before)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(AdapterMismatchError):
        import_shared(model, tmp_path)


def test_wire_numpy_float64_is_accepted_and_cast(setup: tuple) -> None:
    _, model, _ = setup
    glob = {k: v.double().numpy() + 0.25 for k, v in shared_state(model).items()}
    apply_global(model, glob)
    now = shared_state(model)
    assert all(now[k].dtype == torch.float32 and np.allclose(now[k].numpy(), glob[k], atol=1e-6) for k in glob)


PERSONAL_PARTS = ("head", "cross_modal", "cls_token", "modality_embed", "position_embed")  # from the module docs


def test_lora_wraps_exactly_query_value_and_the_modality_projections() -> None:
    config = toy_config(lora_r=4, lora_alpha=12)
    model = build_edge_model(config)
    base = build_base_model(config)
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    attention = (".self.query", ".self.value")
    wanted = {n for n in linears if n.startswith("backbone.encoder.layer.") and n.endswith(attention)}
    wanted |= {f"modality_proj.{m}" for m in config.modality_names}
    wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A")
               for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert wrapped == wanted and len(wanted) == 2 * 2 + 2  # two encoder layers, two modalities
    modules = dict(model.named_modules())
    for name in wanted:
        layer = modules[f"base_model.model.{name}"]
        assert layer.r["default"] == 4 and layer.scaling["default"] == pytest.approx(12 / 4)
    # B starts at zero (so the untrained edge model is the base model), A does not
    shared = shared_state(model)
    assert all(float(t.abs().sum()) == 0 for k, t in shared.items() if ".lora_B." in k)
    assert all(float(t.abs().sum()) > 0 for k, t in shared.items() if ".lora_A." in k)


def test_parameter_counts_add_up_as_counted_by_hand() -> None:
    config = toy_config(lora_r=4)
    model = build_edge_model(config)
    base = build_base_model(config)
    targets = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)
               and (n.endswith((".self.query", ".self.value")) or n.startswith("modality_proj."))]
    shared = sum(4 * (m.in_features + m.out_features) for m in targets)  # A: r x in, B: out x r
    personal = sum(p.numel() for n, p in base.named_parameters() if n.split(".")[0] in PERSONAL_PARTS)
    total = sum(p.numel() for p in base.parameters()) + shared
    assert parameter_counts(model) == {"total": total, "shared": shared, "personal": personal,
                                       "frozen": total - shared - personal}
    assert shared_fraction(model) == pytest.approx(shared / total)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == shared + personal


def test_is_personal_with_and_without_the_peft_prefix() -> None:
    for part in PERSONAL_PARTS:
        assert is_personal(f"{part}.weight") and is_personal(f"base_model.model.{part}.weight")
        assert is_personal(f"{part}.1.sub.weight") and is_personal(f"base_model.model.{part}.0.weight")
    for name in ("base_model.model.modality_proj.env.lora_A.weight", "backbone.encoder.layer.0.attention.self.query",
                 "base_model.model.backbone.embeddings.word_embeddings.weight", "header.weight", "model.head.weight"):
        assert not is_personal(name), name


def test_state_copies_are_detached_and_do_not_alias_the_model(setup: tuple) -> None:
    _, model, inputs = setup
    ref = logits_of(model, inputs)
    shared, personal = shared_state(model), personal_state(model)
    assert all(not t.requires_grad and t.device.type == "cpu" for t in [*shared.values(), *personal.values()])
    for t in [*shared.values(), *personal.values()]:
        t.add_(1.0)
    assert torch.equal(logits_of(model, inputs), ref), "a state copy aliased the model's weights"
    assert shared_state(model, torch.float16)[next(iter(shared))].dtype == torch.float16
    assert shared_state(model)[next(iter(shared))].dtype == torch.float32


def test_load_personal_needs_every_name_with_its_shape_and_casts_the_values(setup: tuple) -> None:
    _, model, _ = setup
    ref = personal_state(model)
    name = next(iter(ref))
    new = {k: (v + 0.5).double() for k, v in ref.items()}
    load_personal(model, new)
    now = personal_state(model)
    assert all(now[k].dtype == ref[k].dtype and torch.allclose(now[k], new[k].float()) for k in ref)
    for bad, error in (({k: v for k, v in new.items() if k != name}, "missing personal tensor names"),
                       ({**new, "head.9.weight": torch.zeros(1)}, "unknown personal tensor names"),
                       ({**new, name: torch.zeros(3, 3, 3)}, "shape")):
        with pytest.raises(AdapterMismatchError, match=error):
            load_personal(model, bad)
        assert all(torch.equal(personal_state(model)[k], now[k]) for k in now)


def test_each_check_on_an_incoming_adapter_has_its_own_error(setup: tuple) -> None:
    _, model, _ = setup
    good = shared_state(model)
    key = next(iter(good))
    unknown = {**good, **{f"base_model.model.nowhere{i}.lora_A.weight": torch.zeros(1) for i in range(6)}}
    with pytest.raises(AdapterMismatchError, match=r"^unknown shared tensor names: \[.*'base_model\.model\."
                                                   r"nowhere4\.lora_A\.weight'\]\.\.\.$"):
        load_shared(model, unknown)
    five = {**good, **{f"base_model.model.nowhere{i}.lora_A.weight": torch.zeros(1) for i in range(5)}}
    with pytest.raises(AdapterMismatchError, match=r"^unknown shared tensor names: \[[^]]*nowhere4[^]]*\]$"):
        load_shared(model, five)  # five names: all listed, no ellipsis
    names = sorted(good)
    with pytest.raises(AdapterMismatchError) as seven_missing:
        load_shared(model, {k: v for k, v in good.items() if k not in names[:7]})
    message = str(seven_missing.value)
    assert message.endswith("]...") and message.count(".lora_") == 5, message  # the first five, then "..."
    with pytest.raises(AdapterMismatchError, match=r"^missing shared tensor names: \[[^]]*\]$"):
        load_shared(model, {k: v for k, v in good.items() if k not in names[:5]})
    with pytest.raises(AdapterMismatchError, match=rf"^missing shared tensor names: \['{re.escape(names[0])}'\]$"):
        load_shared(model, {k: v for k, v in good.items() if k != names[0]})
    with pytest.raises(AdapterMismatchError, match=r"^missing shared tensor names: \[.*\]\.\.\.$"):
        load_shared(model, {k: v for k, v in good.items() if k not in names[:6]})
    with pytest.raises(AdapterMismatchError, match=rf"^{re.escape(key)}: expected a tensor or ndarray, got list$"):
        load_shared(model, {**good, key: good[key].tolist()})
    with pytest.raises(AdapterMismatchError, match=rf"^{re.escape(key)}: expected a floating dtype, got torch.int64$"):
        load_shared(model, {**good, key: good[key].long()})
    with pytest.raises(AdapterMismatchError, match=rf"^{re.escape(key)}: shape \(1, 2\) != expected "):
        load_shared(model, {**good, key: torch.zeros(1, 2)})
    with pytest.raises(NonFiniteAdapterError, match=rf"^{re.escape(key)}: contains NaN or infinite values$"):
        load_shared(model, {**good, key: torch.full_like(good[key], float("inf"))})
    assert all(torch.equal(shared_state(model)[k], good[k]) for k in good)
    load_shared(model, {key: good[key] + 1}, strict=False)  # a subset is fine when not strict
    assert torch.equal(shared_state(model)[key], good[key] + 1)
    with pytest.raises(AdapterMismatchError):
        apply_global(model, {key: good[key]})  # a global is always complete
