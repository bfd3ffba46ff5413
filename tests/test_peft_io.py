"""Tests of glora.peft_io against adapters written by real PEFT (tiny BERT and GPT-2)."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from glora.peft_io import (
    AdapterError,
    IncompatibleAdapters,
    check_compatible,
    load_adapter,
    pattern_key,
    save_adapter,
)
from glora.types import LoRAFactors

BERT_TARGETS = ["query", "value"]


def tiny_bert(hidden: int = 32, seed: int = 0) -> nn.Module:
    """A random 2-layer BertForSequenceClassification (hidden ``hidden``, 3 labels)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=50,
        max_position_embeddings=16,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A randomly initialised 2-layer GPT-2 (n_embd 32, ``Conv1D`` c_attn 32→96)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
    cfg.bos_token_id = cfg.eos_token_id = 0
    return GPT2LMHeadModel(cfg).eval()


def make_adapter(base: nn.Module, path: Path, config: LoraConfig, *, seed: int) -> nn.Module:
    """Wrap a copy of ``base`` with ``config``, give lora_B (and saved heads) random values, save.

    Returns the PeftModel (for ``merge_and_unload`` references).
    """
    pm = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(path))
    return pm


def merged_deltas(
    pm: nn.Module, base: nn.Module, *, transpose: bool = False
) -> dict[str, torch.Tensor]:
    """PEFT's own ``merge_and_unload`` weight minus the base weight, keyed by glora module name."""
    merged = copy.deepcopy(pm).merge_and_unload()
    bw = dict(base.named_parameters())
    out = {}
    for name, w in merged.named_parameters():
        if name.endswith(".weight") and "classifier" not in name and not torch.equal(w, bw[name]):
            d = (w - bw[name]).detach()
            out["base_model.model." + name[: -len(".weight")]] = d.T if transpose else d
    return out


def bert_config(r: int, alpha: float, **kw: object) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=BERT_TARGETS, task_type="SEQ_CLS", **kw)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("bert")
    base = tiny_bert()
    base.save_pretrained(str(root / "base"))
    pms = {
        "a": make_adapter(
            base,
            root / "a",
            bert_config(4, 8, rank_pattern={"layer.1.attention.self.query": 2}),
            seed=1,
        ),
        "b": make_adapter(base, root / "b", bert_config(2, 4, use_rslora=True), seed=2),
        "c": make_adapter(base, root / "c", bert_config(4, 16, alpha_pattern={"value": 3}), seed=3),
    }
    return {"root": root, "base": base, "pms": pms}


def test_load_matches_peft_merge(bert: dict) -> None:
    for name, pm in bert["pms"].items():
        factors, info = load_adapter(bert["root"] / name)
        ref = merged_deltas(pm, bert["base"])
        assert set(factors) == set(ref), name
        for m, f in factors.items():
            assert f.A.dtype == torch.float32
            torch.testing.assert_close(f.delta(), ref[m], atol=1e-5, rtol=1e-5)
        assert info.task_type == "SEQ_CLS"
        assert "base_model.model.classifier.weight" in info.extra_tensors
    _, info_a = load_adapter(bert["root"] / "a")
    q1 = "base_model.model.bert.encoder.layer.1.attention.self.query"
    q0 = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert info_a.ranks[q1] == 2 and info_a.ranks[q0] == 4
    assert info_a.scales[q1] == pytest.approx(8 / 2) and info_a.scales[q0] == pytest.approx(2.0)
    _, info_b = load_adapter(bert["root"] / "b")
    assert info_b.use_rslora and info_b.scales[q0] == pytest.approx(4 / 2**0.5)
    _, info_c = load_adapter(bert["root"] / "c")
    v0 = "base_model.model.bert.encoder.layer.0.attention.self.value"
    assert info_c.alphas[v0] == 3 and info_c.alphas[q0] == 16


def test_pattern_key_is_peft_rule() -> None:
    from peft.utils.other import get_pattern_key

    keys = ["layer.1.attention.self.query", "value"]
    for mod in [
        "base_model.model.bert.encoder.layer.1.attention.self.query",
        "base_model.model.bert.encoder.layer.11.attention.self.query",
        "base_model.model.bert.encoder.layer.0.attention.self.value",
    ]:
        plain = mod.removeprefix("base_model.model.")
        expected = get_pattern_key(keys, plain)
        assert pattern_key(keys, mod) == (expected if expected in keys else None)


def test_gpt2_fan_in_fan_out(tmp_path: Path) -> None:
    base = tiny_gpt2()
    cfg = LoraConfig(
        r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    pm = make_adapter(base, tmp_path / "g", cfg, seed=4)
    factors, info = load_adapter(tmp_path / "g")
    assert info.fan_in_fan_out
    ref = merged_deltas(pm, base, transpose=True)  # Conv1D stores k×d
    for m, f in factors.items():
        assert (f.d, f.k) == (96, 32) == info.shapes[m]
        torch.testing.assert_close(f.delta(), ref[m], atol=1e-5, rtol=1e-5)
    # round trip through save_adapter → PEFT
    save_adapter(
        tmp_path / "g2",
        factors,
        base_model_name_or_path=None,
        target_modules=["c_attn"],
        task_type="CAUSAL_LM",
        fan_in_fan_out=True,
    )
    pm2 = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "g2"))
    ref2 = merged_deltas(pm2, base, transpose=True)
    for m, f in factors.items():
        torch.testing.assert_close(ref2[m], f.delta(), atol=1e-5, rtol=1e-5)


def test_save_mixed_ranks_loads_in_peft(bert: dict, tmp_path: Path) -> None:
    factors, info = load_adapter(bert["root"] / "a")
    g = torch.Generator().manual_seed(0)
    new = {}
    for i, m in enumerate(sorted(factors)):
        r = [5, 3, 1, 5][i]
        new[m] = LoRAFactors(A=torch.randn(r, 32, generator=g), B=torch.randn(32, r, generator=g))
    out = tmp_path / "saved"
    save_adapter(
        out,
        new,
        base_model_name_or_path=str(bert["root"] / "base"),
        target_modules=BERT_TARGETS,
        task_type="SEQ_CLS",
        extra_tensors=info.extra_tensors,
        modules_to_save=info.modules_to_save,
    )
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 5 and cfg["lora_alpha"] == 5
    pm = PeftModel.from_pretrained(copy.deepcopy(bert["base"]), str(out))
    merged = pm.merge_and_unload()
    ref = merged_deltas(pm, bert["base"])
    for m, f in new.items():
        torch.testing.assert_close(ref[m], f.delta(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        merged.classifier.weight, info.extra_tensors["base_model.model.classifier.weight"]
    )
    back, info2 = load_adapter(out)
    for m, f in new.items():
        torch.testing.assert_close(back[m].delta(), f.delta())
        assert info2.ranks[m] == f.rank


def test_save_is_atomic(bert: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    factors, _ = load_adapter(bert["root"] / "a")
    import safetensors.torch

    def boom(*args: object, **kw: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(tmp_path / "x", factors, base_model_name_or_path=None, target_modules=None)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "exists").mkdir()
    with pytest.raises(AdapterError, match="already exists"):
        save_adapter(
            tmp_path / "exists", factors, base_model_name_or_path=None, target_modules=None
        )


def test_bin_format(bert: dict, tmp_path: Path) -> None:
    src = bert["root"] / "b"
    dst = tmp_path / "bin"
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    torch.save(load_file(str(src / "adapter_model.safetensors")), dst / "adapter_model.bin")
    f1, _ = load_adapter(src)
    f2, _ = load_adapter(dst)
    for m in f1:
        torch.testing.assert_close(f1[m].delta(), f2[m].delta())


def _copy_adapter(
    src: Path, dst: Path, *, cfg_update: dict | None = None, tensors: dict | None = None
) -> Path:
    from safetensors.torch import save_file

    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(cfg_update or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(str(src / "adapter_model.safetensors"))
    save_file(tensors if tensors is not None else sd, str(dst / "adapter_model.safetensors"))
    return dst


def test_load_errors(bert: dict, tmp_path: Path) -> None:
    src = bert["root"] / "a"
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"adapter_config\.json"):
        load_adapter(tmp_path / "empty")
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapter(bad)
    ia3 = _copy_adapter(src, tmp_path / "ia3", cfg_update={"peft_type": "IA3"})
    with pytest.raises(AdapterError, match="IA3"):
        load_adapter(ia3)
    dora = _copy_adapter(src, tmp_path / "dora", cfg_update={"use_dora": True})
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(dora)
    noweights = tmp_path / "now"
    noweights.mkdir()
    (noweights / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="neither"):
        load_adapter(noweights)
    sd = load_file(str(src / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    half = _copy_adapter(src, tmp_path / "half", tensors={k: v for k, v in sd.items() if k != key})
    with pytest.raises(AdapterError, match="lora_A but not"):
        load_adapter(half)
    wrong_r = _copy_adapter(src, tmp_path / "wrongr", cfg_update={"rank_pattern": {}})
    with pytest.raises(AdapterError, match="config gives rank 4"):
        load_adapter(wrong_r)


def test_check_compatible(bert: dict, tmp_path: Path) -> None:
    infos = [load_adapter(bert["root"] / n)[1] for n in "abc"]
    assert len(check_compatible(infos)) == 4
    only_q = make_adapter(
        bert["base"],
        tmp_path / "q",
        LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"),
        seed=5,
    )
    del only_q
    info_q = load_adapter(tmp_path / "q")[1]
    with pytest.raises(IncompatibleAdapters, match=re.escape("lacks module(s)")) as e:
        check_compatible([infos[0], info_q])
    assert "intersection" in str(e.value) and str(tmp_path / "q") in str(e.value)
    common = check_compatible([infos[0], info_q], modules="intersection")
    assert common == sorted(m for m in infos[0].ranks if m.endswith("query"))
    wide = tiny_bert(hidden=48)
    make_adapter(wide, tmp_path / "wide", bert_config(2, 2), seed=6)
    info_w = load_adapter(tmp_path / "wide")[1]
    with pytest.raises(IncompatibleAdapters, match="48×48"):
        check_compatible([infos[0], info_w])
    info_w.base_model_name_or_path, infos[0].base_model_name_or_path = "x/one", "x/two"
    with pytest.raises(IncompatibleAdapters, match="base model"):
        check_compatible([infos[0], info_w])
