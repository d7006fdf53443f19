"""LoRA at the policy: the merge equals base + (alpha/r) B @ A and peft's own merge_and_unload,
unmerge gives the base back bit for bit, the receiver's spec check admits an adapter that fits
the served model and refuses one that does not, and the publish hook turns a staged adapter into
the full set Triton loads.

    pytest tests/unit/policy/test_lora.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.lora_adapter import ADAPTER_FILE, AdapterConfig, read_config
from services.common.models import load_causal_lm
from services.common.safetensors_header import file_specs
from services.genproto.rlhf.v1 import events_pb2
from services.policy import lora
from services.policy.updates import WeightsUpdater
from services.policy.weights import (
    WeightsRejected,
    WeightsStore,
    compare_specs,
    files_specs,
    folder_weight_files,
)
from services.trainer.weights_push import write_adapter_version
from tests.support.tiny_models import tiny_causal_lm

P = "base_model.model."


def _hand_adapter(generator, out=6, inp=5, r=2) -> tuple[dict, dict]:
    base = {"m.q.weight": torch.randn(out, inp, generator=generator), "m.n.weight": torch.ones(3)}
    adapter = {
        f"{P}m.q.lora_A.weight": torch.randn(r, inp, generator=generator),
        f"{P}m.q.lora_B.weight": torch.randn(out, r, generator=generator),
    }
    return base, adapter


def test_merge_is_base_plus_scaled_b_times_a_on_hand_made_tensors():
    g = torch.Generator().manual_seed(0)
    base, adapter = _hand_adapter(g)
    a, b = adapter[f"{P}m.q.lora_A.weight"], adapter[f"{P}m.q.lora_B.weight"]
    merged = lora.merge(base, adapter, scaling=8 / 2)
    expected = base["m.q.weight"].clone()
    for o in range(6):  # the obvious loop: W[o, i] += 4 * sum_k B[o, k] A[k, i]
        for i in range(5):
            expected[o, i] += 4.0 * sum(float(b[o, k] * a[k, i]) for k in range(2))
    assert torch.allclose(merged["m.q.weight"], expected, atol=1e-5)
    assert merged["m.n.weight"] is base["m.n.weight"]  # untouched tensors are not copied
    assert not torch.equal(merged["m.q.weight"], base["m.q.weight"])


def test_unmerge_restores_a_bf16_base_exactly():
    """Subtracting B @ A from a bf16 merge would not give the base back; unmerge copies it."""
    g = torch.Generator().manual_seed(1)
    base, adapter = _hand_adapter(g, out=64, inp=64, r=4)
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    merged = lora.merge(base, adapter, scaling=2.0)
    assert merged["m.q.weight"].dtype == torch.bfloat16
    subtracted = (
        merged["m.q.weight"].float()
        - lora.delta(
            adapter[f"{P}m.q.lora_A.weight"], adapter[f"{P}m.q.lora_B.weight"], scaling=2.0
        )
    ).to(torch.bfloat16)
    assert not torch.equal(subtracted, base["m.q.weight"])  # why the base is kept
    restored = lora.unmerge(merged, base, adapter)
    assert all(torch.equal(restored[k], base[k]) for k in base)


def test_a_half_pair_or_a_misfit_is_refused():
    g = torch.Generator().manual_seed(2)
    base, adapter = _hand_adapter(g)
    with pytest.raises(ValueError, match="lacks its lora_B"):
        lora.merge(base, {f"{P}m.q.lora_A.weight": adapter[f"{P}m.q.lora_A.weight"]}, 1.0)
    wrong = dict(adapter) | {f"{P}m.q.lora_B.weight": torch.zeros(7, 2)}
    with pytest.raises(ValueError, match="does not fit"):
        lora.merge(base, wrong, 1.0)


@pytest.fixture(scope="module")
def tiny_peft(tmp_path_factory):
    """A tiny random Llama with a LoRA adapter on q/k/v/o whose B is random (peft starts it at
    zero, which would make every merge trivially equal to the base)."""
    from peft import LoraConfig, get_peft_model

    folder = tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm-lora"))
    model = load_causal_lm(folder, torch.device("cpu"), torch.float32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return folder, base, peft_model


def _adapter(peft_model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def test_merge_equals_peft_merge_and_unload(tiny_peft):
    _, base, peft_model = tiny_peft
    adapter = _adapter(peft_model)
    assert len(lora.pairs(adapter)) == 2 * 4  # 2 layers x q/k/v/o
    ours = lora.merge(base, adapter, scaling=12 / 4)
    theirs = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(ours) == set(theirs)
    changed = 0
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=1e-6, rtol=1e-5), name
        changed += not torch.equal(base[name], tensor)
    assert changed == 8
    restored = lora.unmerge(ours, base, adapter)
    assert all(torch.equal(restored[k], base[k]) for k in base)


def test_spec_check_admits_a_fitting_adapter_and_refuses_a_misfit(tiny_peft, tmp_path):
    folder, _, peft_model = tiny_peft
    served = files_specs(folder_weight_files(folder))
    adapter = _adapter(peft_model)
    save_file(adapter, tmp_path / ADAPTER_FILE)
    specs = file_specs(tmp_path / ADAPTER_FILE)
    assert lora.is_adapter(specs) and not lora.is_adapter(served)
    compare_specs(served, specs, "manifest vs served model")  # fits: no raise
    compare_specs(specs, specs, "files vs manifest")  # equality still applies between adapters
    name = f"{P}model.layers.0.self_attn.q_proj.lora_A.weight"
    bad = dict(specs) | {name: ((4, 65), "F32")}
    with pytest.raises(WeightsRejected, match="do not fit the served"):
        compare_specs(served, bad, "manifest vs served model")
    stray = dict(specs) | {f"{P}model.layers.0.mlp.nope.lora_A.weight": ((4, 64), "F32")}
    with pytest.raises(WeightsRejected, match="half a pair"):
        compare_specs(served, stray, "manifest vs served model")
    missing = {
        f"{P}lm_head.lora_A.weight": ((4, 64), "F32"),
        f"{P}lm_head.lora_B.weight": ((49152, 4), "F32"),
    }
    with pytest.raises(WeightsRejected, match="does not hold"):
        compare_specs(served, missing, "manifest vs served model")


def _updater(tmp_path, base_folder, version=1):
    swapped = []
    updater = WeightsUpdater(
        WeightsStore(tmp_path / "weights"),
        files_specs(folder_weight_files(base_folder)),
        version,
        swap=lambda: swapped[-1] if swapped else version,
        base_folders={1: base_folder},
    )
    original = updater.store.publish

    def publish(v, staged):  # Triton would now serve what CURRENT names
        marker = original(v, staged)
        swapped.append(v)
        return marker

    updater.store.publish = publish
    return updater


def _event(folder, version) -> events_pb2.WeightsVersionEvent:
    from services.common.digest import sha256_file

    return events_pb2.WeightsVersionEvent(
        model="policy",
        weights_version=version,
        file_sha256={ADAPTER_FILE: sha256_file(folder / ADAPTER_FILE)},
        location=str(folder),
    )


def test_publish_merges_a_staged_adapter_into_the_full_set(tiny_peft, tmp_path):
    folder, base, peft_model = tiny_peft
    adapter = _adapter(peft_model)
    config = AdapterConfig(4, 12.0, ("k_proj", "o_proj", "q_proj", "v_proj"), base_version=1)
    pushed = write_adapter_version(tmp_path / "trainer", 2, adapter, config, {"r": 4})
    assert read_config(pushed / ADAPTER_FILE) == config
    updater = _updater(tmp_path, folder)
    assert updater.install_folder(_event(pushed, 2)) == 2
    published = updater.store.folders.path(2)
    # Triton is pointed at the merged full set only; the adapter is kept beside it, out of sight.
    shards = folder_weight_files(published)
    assert sorted(p.name for p in shards) == sorted([lora.MERGED_FILE, lora.REST_FILE])
    assert (published / lora.KEPT_ADAPTER_DIR / ADAPTER_FILE).is_file()
    compare_specs(updater.served_specs, files_specs(shards), "served")
    merged = {k: v for p in shards for k, v in load_file(p).items()}
    theirs = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(merged) == set(theirs) - {"lm_head.weight"}  # tied: stored once, as in the base
    for name, tensor in merged.items():
        assert torch.allclose(tensor, theirs[name], atol=1e-6, rtol=1e-5), name
    assert set(load_file(published / lora.MERGED_FILE)) == set(lora.pairs(adapter))
    assert updater.last_merge_s > 0

    # The next version links the same untouched-tensor shard instead of writing it again; one
    # overwritten in place (a recycled folder) is noticed and written afresh.
    pushed = write_adapter_version(tmp_path / "trainer", 3, adapter, config)
    assert updater.install_folder(_event(pushed, 3)) == 3
    rest2, rest3 = (updater.store.folders.path(v) / lora.REST_FILE for v in (2, 3))
    assert rest2.stat().st_ino == rest3.stat().st_ino
    with open(rest3, "r+b") as f:
        f.seek(rest3.stat().st_size - 4)
        f.write(b"\0\0\0\0")
    pushed = write_adapter_version(tmp_path / "trainer", 4, adapter, config)
    assert updater.install_folder(_event(pushed, 4)) == 4
    rest4 = updater.store.folders.path(4) / lora.REST_FILE
    assert rest4.stat().st_ino != rest3.stat().st_ino
    expected = {k: v for k, v in base.items() if k in load_file(rest4)}
    assert all(torch.equal(load_file(rest4)[k], v) for k, v in expected.items()) and expected


def test_an_adapter_for_an_unknown_base_is_refused_and_nothing_changes(tiny_peft, tmp_path):
    folder, _, peft_model = tiny_peft
    config = AdapterConfig(4, 12.0, ("q_proj",), base_version=7)
    pushed = write_adapter_version(tmp_path / "trainer", 2, _adapter(peft_model), config)
    updater = _updater(tmp_path, folder)
    with pytest.raises(WeightsRejected, match="LoRA adapter not merged"):
        updater.install_folder(_event(pushed, 2))
    assert updater.version == 1 and updater.store.folders.folders() == []
