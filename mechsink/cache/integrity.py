"""``verify``: every file of a store checked, all bytes read; with ``repair``, damaged shards are
dropped (a rerun recomputes their samples) and a damaged or stale index is rebuilt."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mechsink.cache.index import _merge
from mechsink.cache.layout import (
    StoreCorrupt, StoreError, _REPAIR, _ShardMeta, _clean_debris, _first_line, _read_config, _repair_shard,
    _shard_names, _unlink_quietly, file_crc32,
)
from mechsink.cache.locks import _hold_all_locks
from mechsink.cache.store import _read_summary
from mechsink.cache.tensorfile import _shard_dims, read_safetensors_header


def verify(path: str | os.PathLike, repair: bool = False) -> dict:
    """Check every file of a store: config, each shard's metadata, page checksums, size and crc32
    of its tensors, the samples' uniqueness, summary.json and index.parquet (all bytes read).

    With ``repair``: damaged shards are deleted (their samples are recomputed by rerunning the
    same cache command, which resumes), and a damaged or stale index/summary is rebuilt by a merge
    when no shard was lost (else deleted, and the rerun merges). Refuses while a writer is alive.

    Returns a JSON-ready dict: store, ok (no problem found), merged, shards, samples, rows,
    bytes_checked, problems [{file, problem}], debris [files], repaired [actions], next (what to run).
    """
    root = Path(path)
    cfg = _read_config(root)
    locks = _hold_all_locks(root) if repair else []
    try:
        return _verify(root, cfg, repair)
    finally:
        for lock in locks:
            lock.release()


def _verify(root: Path, cfg: dict, repair: bool) -> dict:
    sites, dtype = tuple(cfg["sites"]), cfg["dtype"]
    shards = root / "shards"
    report: dict[str, Any] = {"store": str(root), "ok": True, "merged": False, "shards": 0, "samples": 0, "rows": 0,
                              "bytes_checked": 0, "problems": [], "debris": [], "repaired": [], "next": None}
    problems: list[dict] = report["problems"]

    def problem(file: Path | str, e: BaseException | str) -> None:
        problems.append({"file": str(file), "problem": str(e)})

    names = _shard_names(shards) if shards.is_dir() else []
    bad: set[str] = set()
    owner: dict[int, str] = {}
    crcs: dict[str, dict] = {}
    for name in names:
        try:
            m = _ShardMeta(root, name)
            _shard_dims(m.tensors, sites, dtype)
            n_t = {read_safetensors_header(m.tensors)[1][s]["shape"][0] for s in sites}
            if n_t != {m.num_rows}:
                raise StoreCorrupt(f"{m.tensors} holds {sorted(n_t)} rows, its parquet {m.num_rows}; {_repair_shard(m.tensors)}")
            crc, size = file_crc32(m.tensors)
            report["bytes_checked"] += size
            if size != m.tensor_bytes:
                raise StoreCorrupt(f"{m.tensors} has {size} bytes, {m.tensor_bytes} were written; {_repair_shard(m.tensors)}")
            if crc != m.tensor_crc:
                raise StoreCorrupt(f"{m.tensors} is corrupt (crc32 {crc[6:]} != {m.tensor_crc[6:]} written); "
                                   f"{_repair_shard(m.tensors)}")
            try:
                pq.ParquetFile(m.parquet, page_checksum_verification=True).read(use_threads=False)
            except (pa.ArrowException, OSError) as e:
                raise StoreCorrupt(f"{m.parquet} is corrupt ({_first_line(e)}); {_repair_shard(m.parquet)}") from None
            pcrc, psize = file_crc32(m.parquet)
            report["bytes_checked"] += psize
            crcs[f"shards/{name}.parquet"] = {"crc32": pcrc, "bytes": psize}
            crcs[f"shards/{name}.safetensors"] = {"crc32": crc, "bytes": size}
        except StoreError as e:
            bad.add(name)
            problem(shards / f"{name}.safetensors", e)
            continue
        for s in m.samples.tolist():
            if s in owner:
                problem(m.parquet, f"sample {s} is also in shard {owner[s]}; run `mechsink verify --cache {root} "
                        "--repair` after deleting one of the two shards")
            owner[s] = name
        report["rows"] += m.num_rows
    report["shards"], report["samples"] = len(names), len(owner)
    if shards.is_dir():
        debris = [p for p in shards.glob("*.tmp")]
        debris += [p for p in shards.glob("*.safetensors") if not p.with_suffix(".parquet").exists()]
        report["debris"] = sorted(str(p) for p in debris)

    stale_index = False
    if (root / "summary.json").exists():
        try:
            summary = _read_summary(root)
            report["merged"] = True
            if summary.get("shards") != names:
                stale_index = True
                gone = [n for n in summary.get("shards", []) if n not in set(names)]
                if gone:
                    problem(shards / f"{gone[0]}.parquet", f"{len(gone)} merged shard(s) are missing, e.g. {gone[0]}")
                else:
                    problem(root / "index.parquet", "index.parquet is out of date with shards/ (run mechsink.cache.merge)")
            for rel, want in summary.get("files", {}).items():
                if rel.startswith("shards/"):
                    if rel in crcs and crcs[rel] != want:
                        bad.add(Path(rel).stem)
                        problem(root / rel, f"{root / rel} differs from the bytes merged (crc32 {crcs[rel]['crc32'][6:]} "
                                f"!= {want['crc32'][6:]}); {_repair_shard(root / rel)}")
                    continue
                try:
                    crc, size = file_crc32(root / rel)
                except FileNotFoundError:
                    stale_index = True
                    problem(root / rel, f"{root / rel} is missing; {_REPAIR['index.parquet'].replace('DIR', str(root))}")
                    continue
                report["bytes_checked"] += size
                if (crc, size) != (want["crc32"], want["bytes"]):
                    stale_index = True
                    problem(root / rel, f"{root / rel} is corrupt (crc32 {crc[6:]} != {want['crc32'][6:]} written); "
                            f"{_REPAIR['index.parquet'].replace('DIR', str(root))}")
        except StoreError as e:
            stale_index = True
            problem(root / "summary.json", e)
    report["ok"] = not problems
    if repair and (problems or report["debris"]):
        for name in sorted(bad):
            for ext in ("parquet", "safetensors"):     # parquet first: the shard is uncommitted at once
                _unlink_quietly(shards / f"{name}.{ext}")
            report["repaired"].append(f"deleted damaged shard {name}")
        _clean_debris(shards, "r")
        if report["debris"]:
            report["repaired"].append(f"deleted {len(report['debris'])} uncommitted file(s)")
        if bad:
            _unlink_quietly(root / "index.parquet", root / "summary.json")
            report["repaired"].append("deleted index.parquet and summary.json (a rerun rebuilds them)")
            report["next"] = ("rerun the same `mechsink cache` command: it resumes and recomputes the samples of the "
                              f"{len(bad)} deleted shard(s)")
        elif stale_index or report["merged"] is False and names:
            _merge(root, cfg, _shard_names(shards))
            report["repaired"].append("rebuilt index.parquet and summary.json from the shards")
    return report
