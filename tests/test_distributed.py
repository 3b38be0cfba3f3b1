"""Data parallel under torchrun: ablate, patch_dataset and probe over a cache on 2 CPU ranks (gloo)
give exactly the frames of one process (chunks are sharded by number, results merged in order)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mechsink.cache import StoreWriter

sys.path.insert(0, str(Path(__file__).parent))
from _cache_worker import CONFIG, make_sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "_dist_worker.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def test_two_ranks_give_the_numbers_of_one(tmp_path):
    store = tmp_path / "cache"
    with StoreWriter(store, CONFIG, shard_rows=8, dtype="float32") as w:
        for i in range(0, 60, 5):
            parts = [make_sample(j) for j in range(i, i + 5)]
            w.add(pd.concat([p[0] for p in parts], ignore_index=True),
                  {s: __import__("torch").cat([p[1][s] for p in parts]) for s in CONFIG.sites}, samples=list(range(i, i + 5)))
        w.finalize()
    runs = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])):
        cmd = [sys.executable, *launcher, str(WORKER), str(tmp_path / name), str(store)]
        r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = tmp_path / name
    assert json.loads((runs["two"] / "meta.json").read_text())["world"] == 2
    one_meta, two_meta = (json.loads((runs[k] / "meta.json").read_text()) for k in ("one", "two"))
    assert one_meta["notes"] == two_meta["notes"] and one_meta["probes"] == two_meta["probes"]
    for k in ("ablate", "patch", "probe", "splits"):
        a, b = (pd.read_parquet(runs[n] / f"{k}.parquet") for n in ("one", "two"))
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert pd.read_parquet(runs["one"] / "ablate.parquet")["batch"].nunique() == 3      # three chunks, two ranks
