"""Data parallel under torchrun: ablate, patch_dataset, probe over a cache and the report's section
drivers (detect_dataset with a calibrated rule, attention_stats, visual_subsets, evaluate_reorder) on
2 CPU ranks (gloo) give exactly the frames of one process (chunks are sharded by number, results
merged in order); the whole report on 2 ranks gives exactly the numbers of one, and only rank 0
writes it; an error on one rank fails the run instead of hanging it."""
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
    assert (one_meta["tau"], one_meta["n_calib"]) == (two_meta["tau"], two_meta["n_calib"]) and one_meta["n_calib"] > 0
    for k in ("ablate", "patch", "probe", "splits", "detect", "norms", "attention", "subsets", "reorder"):
        a, b = (pd.read_parquet(runs[n] / f"{k}.parquet") for n in ("one", "two"))
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert pd.read_parquet(runs["one"] / "ablate.parquet")["batch"].nunique() == 3      # three chunks, two ranks
    assert pd.read_parquet(runs["one"] / "detect.parquet")["batch"].nunique() == 3     # detection: three chunks too


TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
SMALL_REPORT = {"model": "toy-llava", "control": "planted-llava", "limit": 24, "causal_limit": 8, "attention_limit": 4,
                "draws": 2, "batch_size": 2}    # 8 images in chunks of 2: every section has chunks on both ranks


@pytest.mark.slow
def test_report_on_two_ranks_gives_the_numbers_of_one_and_rank_0_writes_it(tmp_path):
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL_REPORT))
    runs = {}
    for name, launcher in (("one", []), ("two", TWO)):
        out = tmp_path / name
        cmd = [*launcher, str(WORKER), "report", str(out), str(config), str(tmp_path / f"audit-{name}")]
        r = subprocess.run(cmd if launcher else [sys.executable, *cmd], env=ENV, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count('"manifest":') == 1, r.stdout[-2000:]               # rank 0 alone prints the result
        runs[name] = out, json.loads((out / "manifest.json").read_text())
    (one, a), (two, b) = runs["one"], runs["two"]
    assert len(a["numbers"]) > 200 and not [k for k in a["numbers"] if k.endswith(".not_run")]
    assert a["numbers"] == b["numbers"]                  # every number exactly, as canonical JSON writes it
    assert a["config"] == b["config"] and a["config_sha256"] == b["config_sha256"]
    assert [f["caption"] for f in a["artifacts"]["figures"]] == [f["caption"] for f in b["artifacts"]["figures"]]
    assert a["artifacts"]["tables"] == b["artifacts"]["tables"]
    # what each rank wrote into the report folder: rank 1 only its shards of the shared activation caches
    audit = {r: json.loads((tmp_path / f"audit-two.r{r}.json").read_text()) for r in (0, 1)}
    assert audit[0]["world"] == audit[1]["world"] == 2
    inside = {r: [w.split(" ", 1) for w in audit[r]["written"] if w.split(" ", 1)[1].startswith(str(two) + os.sep)]
              for r in (0, 1)}
    assert any(p == str(two / "index.html") or p.startswith(str(two / ".index.html")) for _, p in inside[0])
    assert any(p.endswith("manifest.json") for _, p in inside[0])
    assert inside[1], "rank 1 wrote no activation shards"
    caches = [str(two / "work" / key / "activations") for key in ("main", "control")]
    stray = [(e, p) for e, p in inside[1] if not any(p == c or p.startswith(c + os.sep) for c in caches)
             and not (e == "os.mkdir" and any(p == os.path.dirname(c) for c in caches))]   # the cache's parent
    assert stray == [], stray
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    shards = sorted(p.name for p in (two / "work" / "main" / "activations" / "shards").glob("*.parquet"))
    assert [s[:3] for s in shards] == ["r00", "r01"]


def test_an_error_on_one_rank_fails_every_rank(tmp_path):
    """Rank 1 alone meets an error inside a sharded analysis: both ranks raise (the same MechsinkError
    message on rank 0) and the run ends at once instead of waiting in the next collective."""
    script = tmp_path / "fail.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from mechsink import distributed
from mechsink.errors import MechsinkError
try:
    with distributed.fail_together():
        if distributed.rank() == 1:
            raise MechsinkError("chunk 1 cannot be analysed")
    print("no error", distributed.rank())
except MechsinkError as e:
    print(f"rank {{distributed.rank()}} raised {{type(e).__name__}}: {{e}}", flush=True)
    distributed.barrier()          # the ranks still agree: later collectives pair up
    sys.exit(3)
""")
    r = subprocess.run([*TWO, str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "rank 1 raised MechsinkError: chunk 1 cannot be analysed" in r.stdout
    assert "rank 0 raised RankFailedError: chunk 1 cannot be analysed" in r.stdout
    assert "no error" not in r.stdout


@pytest.mark.parametrize("procs, gpus, want", [
    (1, 8, [list(range(8))]),
    (2, 8, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (4, 8, [[0, 1], [2, 3], [4, 5], [6, 7]]),
    (3, 8, [[0, 1], [2, 3], [4, 5]]),          # the odd GPU out is left unused, not shared
    (8, 8, [[k] for k in range(8)]),
])
def test_each_local_rank_gets_its_own_gpus_for_device_map_auto(monkeypatch, procs, gpus, want):
    """Under torchrun, device_map="auto" spreads each rank's model over that rank's share of the
    node's GPUs: disjoint, contiguous, equal shares."""
    from mechsink.distributed import local_gpus
    got = []
    for local in range(procs):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(procs))
        monkeypatch.setenv("LOCAL_RANK", str(local))
        got.append(local_gpus(gpus))
    assert got == want
    flat = [g for share in got for g in share]
    assert len(flat) == len(set(flat))


def test_more_processes_than_gpus_for_device_map_auto_is_one_line(monkeypatch):
    from mechsink.distributed import local_gpus
    from mechsink.errors import MechsinkError
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(MechsinkError, match="4 processes on this node share 2 GPU"):
        local_gpus(2)
