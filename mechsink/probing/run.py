"""``probe(store, config)``: train and score probes for every (token set, site) of a cache, with an
optional checkpoint directory that a rerun resumes from."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..atomic import write_text
from ..config import coerce
from ..distributed import gather, mine, rank, world
from ..errors import SiteError
from ..memory import trim
from ..results import json_safe
from ..sites import Site
from .config import ProbeConfig, ProbeError
from .features import _features
from .fit import fit_batches
from .labels import _Index, _int_type, _labels
from .linear import LinearProbe, load_probe
from .result import PROBES, RESULT_COLUMNS, SPLIT_COLUMNS, ProbeResult, probe_name
from .scoring import _cross_val, _score
from .sets import _token_set

log = logging.getLogger("mechsink")


def _site_order(sites: Sequence[str]) -> list[str]:
    def key(s):
        try:
            return (0, Site.parse(s).order, s)
        except SiteError:
            return (1, (), s)
    return sorted(sites, key=key)


MEMORY_MB = 1024.0  # features of one (token set, site), and a set's per-token arrays, held up to this size; beyond, streamed


def probe(store, config: ProbeConfig | Mapping[str, Any] | None = None, out: str | os.PathLike | None = None,
          *, memory_mb: float = MEMORY_MB, **settings) -> ProbeResult:
    """Train and score probes for every (token set, site); see :mod:`mechsink.probing`.

    store: a Store or a cache directory. config: a ProbeConfig or its dict; keyword ``settings``
    (``label=...``) build or amend one. out: when given, every finished (token set, site) is
    written there at once (its row to rows.jsonl, its probe to probes/) and a rerun with the same
    config skips it, so an interrupted run loses at most the probe in progress; the finished result
    is saved there at the end (``ProbeResult.save``; no figure: see ``report.figures.probe_figure``).
    memory_mb: a (token set, site)'s features are read once and held when they fit in it (float16
    from a float16 store, else float32), else streamed from the store on every pass of every fit
    (slower, memory flat in the cache size);
    a token set's per-token arrays likewise, else spilled to a scratch folder. The probe is exactly
    the same (blocks depend on the width only), so the budget is not part of the config.
    """
    from ..cache import Store

    if config is None:
        config = ProbeConfig(**settings)
    else:
        config = coerce(ProbeConfig, config)
        if settings:
            config = config.replace(**settings)
    if not isinstance(store, Store):
        store = Store.open(store)
    index = _Index(store)
    sites = list(store.sites) if config.sites is None else list(config.sites)
    missing = [s for s in sites if s not in store.sites]
    if missing:
        raise ProbeError(f"sites {missing} are not in the cache; it has {list(store.sites)}")
    sites = _site_order(sites)
    depth = {s: i for i, s in enumerate(_site_order(store.sites))}
    lab = _labels(index, config)
    trim()  # each phase below peaks on its own, not on top of what the ones before freed
    done = _resume(out, config, store) if out is not None else {}

    # job j = (token set, site) runs on rank j % world (torchrun); items are tagged with j and merged
    rows, probes, splits, notes = [], [], [], []
    recorded: dict[str, set[str]] = {}
    for t, name in enumerate(config.token_sets):
        s = _token_set(name, index, lab, config, memory_mb)
        if isinstance(s, str):
            if mine(t * len(sites)):
                notes.append((t * len(sites), s))
            log.info("probe: %s", s)
            continue
        for j, site in enumerate(sites, start=t * len(sites)):
            if not mine(j):
                continue
            key = (name, site)
            if key in done:
                rows.append((j, done[key][0]))
                probes.append((j, (key, done[key][1])))
                continue
            item = _fit_one(store, s, site, lab, config, memory_mb, recorded, depth[site])
            trim()
            if isinstance(item, str):
                notes.append((j, item))
                continue
            row, probe_, split = item
            if split is not None:
                splits.append((j, split))
            probes.append((j, (key, probe_)))
            rows.append((j, row))
            if out is not None and world() == 1:
                _checkpoint(Path(out), row, probe_)
        del s  # the next set's arrays do not meet this one's
        trim()

    rows, probes, notes = gather(rows), dict(gather(probes)), gather(notes)
    first, split_parts = set(), []
    for name, used, recs in gather(splits):          # the first site reading the same rows records them
        if (name, used) not in first:
            first.add((name, used))
            split_parts.append(recs)
    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    split_frame = _split_frame(split_parts, list(config.token_sets), sites, lab.group_names)
    result = ProbeResult(frame, config, {"notes": notes, "store_id": store.id}, probes=probes, splits=split_frame)
    if out is not None and rank() == 0:
        result.save(out)
    return result


def _fit_one(store, s, site: str, lab, config: ProbeConfig, memory_mb: float, recorded: dict, depth: int):
    """One (token set, site): (result row, probe, split records or None), or a note saying why it
    is left out. A function of its own so that what it holds is freed when it returns."""
    name, n_classes = s.name, len(lab.classes)
    feats = _features(store, s, site, memory_mb)
    seen = _Finite(s, n_classes)
    if not seen.n:
        return f"{name} @ {site}: no activations cached for these tokens"
    folds = np.unique(s.fold_of_group[seen.images]).tolist()      # the folds with finite rows
    if len(folds) < 2:
        return f"{name} @ {site}: its images fall in fewer than 2 folds"
    split = None
    if seen.hash not in recorded.setdefault(name, set()):  # sites reading the same rows share splits
        recorded[name].add(seen.hash)
        split = (name, seen.hash, _split_records(name, site, folds, seen.images, s.fold_of_group))
    real = _score(_cross_val(feats, s, folds, False, n_classes, config), config)
    ctrl = _score(_cross_val(feats, s, folds, True, n_classes, config), config) if config.control else None
    w, b = fit_batches(feats, lambda: s.batches(feats.block_rows, lambda c: c["ok"]), n_classes, config)
    meta = {"label": config.label, "level": lab.level, "token_set": name, "site": site,
            "aggregate": real.aggregate, "store_id": store.id, "config": config.to_dict(), "n_tokens": seen.n}
    probe_ = LinearProbe(w, b, lab.classes, config.model, meta)
    acc, c_acc = real.accuracy, (ctrl.accuracy if ctrl else (math.nan,) * 3)
    present = np.flatnonzero(seen.classes)
    row = {"label": config.label, "level": lab.level, "token_set": name, "site": site, "depth": depth,
           "unit": "image" if lab.level == "image" else "token", "aggregate": real.aggregate,
           "metric": "balanced_accuracy", "accuracy": acc[0], "ci_low": acc[1], "ci_high": acc[2],
           "token_accuracy": real.token_accuracy, "control_accuracy": c_acc[0], "control_ci_low": c_acc[1],
           "control_ci_high": c_acc[2], "selectivity": acc[0] - c_acc[0], "majority": real.majority,
           "chance": 1.0 / len(present), "n_classes": int(len(present)),
           "n_images": int(len(seen.images)), "n_units": real.n_units, "n_tokens": seen.n,
           "k": len(folds), "model": config.model}
    log.info("probe %s @ %s: accuracy %.3f [%.3f, %.3f], control %.3f", name, site, *acc, c_acc[0])
    return row, probe_, split


class _Finite:
    """What a pass over a set's finite rows at a site says: how many (n), a hash of which ones
    (sites that read the same rows share their splits), the images with one, and rows per class."""

    def __init__(self, s, n_classes: int) -> None:
        h = hashlib.sha256()
        has = np.zeros(len(s.fold_of_group), dtype=bool)
        self.classes = np.zeros(n_classes, dtype=np.int64)
        for _, c in s.cols.chunks(("ok", "y", "group")):
            ok = c["ok"]
            h.update(ok.tobytes())
            has[c["group"][ok]] = True
            self.classes += np.bincount(c["y"][ok], minlength=n_classes)
        self.n, self.hash, self.images = int(self.classes.sum()), h.hexdigest(), np.flatnonzero(has)


def _split_records(name, site, folds: list[int], images: np.ndarray, fold_of_group: np.ndarray) -> tuple:
    """(token set, site, fold [m], image code [m], tested [m]): the images on each side of each
    fold (``images``: those with finite rows; codes, not strings: a record per image)."""
    fold, image, tested = [], [], []
    images = images.astype(_int_type(len(fold_of_group)))        # codes in the smallest type: a record per image
    of = fold_of_group[images]
    for i, f in enumerate(folds):
        for is_test, g in ((False, images[of != f]), (True, images[of == f])):
            fold.append(np.full(len(g), i, dtype=np.int16))
            image.append(g)
            tested.append(np.full(len(g), is_test))
    return name, site, np.concatenate(fold), np.concatenate(image), np.concatenate(tested)


def _split_frame(parts: list[tuple], token_sets: list[str], sites: list[str], group_names: np.ndarray) -> pd.DataFrame:
    """The split records as one frame (SPLIT_COLUMNS), its strings categorical: one code per row."""
    if not parts:
        return pd.DataFrame(columns=SPLIT_COLUMNS)
    n = [len(p[2]) for p in parts]

    def cat(codes, categories):
        return pd.Categorical.from_codes(codes, categories=categories)
    return pd.DataFrame({
        "token_set": cat(np.repeat([token_sets.index(p[0]) for p in parts], n), token_sets),
        "site": cat(np.repeat([sites.index(p[1]) for p in parts], n), sites),
        "fold": np.concatenate([p[2] for p in parts]),
        # Index.astype keeps the path strings there are (a numpy str array would be paths x widest path x 4 bytes)
        "image": cat(np.concatenate([p[3] for p in parts]), pd.Index(group_names).astype(str)),
        "side": cat(np.concatenate([p[4] for p in parts]).astype(np.int8), ["train", "test"]),
    }, columns=SPLIT_COLUMNS)


def _recorded_hash(have: dict) -> str | None:
    """The config hash a checkpoint directory was written with; a directory from before the full
    fingerprint (16 hex digits) is judged by its recorded config instead."""
    h = have.get("config_hash")
    if isinstance(h, str) and len(h) < 64 and isinstance(have.get("config"), dict):
        try:
            return ProbeConfig.from_dict(have["config"]).fingerprint()
        except (ProbeError, ValueError, TypeError):
            return h
    return h


def _resume(out, config: ProbeConfig, store) -> dict:
    """{(token_set, site): (row, probe)} finished by an earlier run of this config into out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = {"config": config.to_dict(), "config_hash": config.fingerprint(), "store_id": store.id}
    cfg = out / "config.json"
    if cfg.exists():
        have = json.loads(cfg.read_text())
        if (_recorded_hash(have), have.get("store_id")) != (run["config_hash"], run["store_id"]):
            raise ProbeError(f"{out} holds probes of another config or cache; use a new output directory")
    else:
        write_text(cfg, json.dumps(run, indent=2) + "\n")
    done = {}
    log_file = out / "rows.jsonl"
    if log_file.exists():
        for line in log_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that probe is redone
            key = (row["token_set"], row["site"])
            try:
                done[key] = (row, load_probe(out / PROBES / probe_name(*key)))
            except ProbeError:
                continue
    return done


def _checkpoint(out: Path, row: dict, p: LinearProbe) -> None:
    p.save(out / PROBES / probe_name(row["token_set"], row["site"]))
    path = out / "rows.jsonl"
    torn = path.exists() and path.stat().st_size and path.read_bytes()[-1:] != b"\n"  # a kill mid-line
    with open(path, "a") as f:  # after the probe: a row on disk always has its probe
        f.write(("\n" if torn else "") + json.dumps(json_safe(row)) + "\n")
        f.flush()
        os.fsync(f.fileno())
