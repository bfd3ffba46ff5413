"""Fixtures of the simulator tests: a synthetic GLUE directory and a tiny-BERT config."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

_POS = ["good", "great", "lovely", "superb", "fun", "moving", "brilliant", "warm"]
_NEG = ["bad", "awful", "dull", "boring", "weak", "tedious", "poor", "flat"]


def write_glue(root: Path, n_train: int = 96, n_dev: int = 32) -> Path:
    """A small synthetic GLUE tree (SST-2 and STS-B) under ``root``; returns it."""
    rng = random.Random(0)
    sst = root / "SST-2"
    sst.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            words = rng.sample(_POS if label else _NEG, 3)
            rows.append(f"the film is {' and '.join(words)} number {i}\t{label}")
        (sst / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    sts = root / "STS-B"
    sts.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["index\tsentence1\tsentence2\tscore"]
        for i in range(n):
            score = round(rng.uniform(0, 5), 2)
            rows.append(f"{i}\ta man plays {i}\ta man sings {i % 7}\t{score}")
        (sts / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glue(tmp_path_factory.mktemp("glue"))


def tiny_raw(glue: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A raw tiny-BERT config (2 clients, ranks [2, 4], 2 steps), updated by ``sections``."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "model": {"name": "tiny-bert", "max_length": 24},
        "data": {"task": "sst2", "dir": str(glue), "max_eval_examples": 16},
        "federation": {"clients": 2, "partition": "iid", "ranks": [2, 4], "participation": 1.0},
        "method": {"name": "glora"},
        "training": {
            "rounds": 1,
            "local_steps": 2,
            "batch_size": 8,
            "device": "cpu",
            "num_threads": 1,
            "eval_batch_size": 32,
        },
        "output": {"dir": str(out)},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw
