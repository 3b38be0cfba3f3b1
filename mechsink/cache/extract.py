"""Extracting activations from a model over a dataset into a Store.

    store = extract(mechsink.load("planted-llava"), open_dataset("data.jsonl"),
                    sites=["vit.out", "llm.blocks.1.hook_resid_post"], tokens=["image", "text"],
                    out="cache/planted", store_dtype="float16", batch_size=16)
    store.index.query("is_sink")                          # one row per cached token
    store.get("vit.out", rows=store.index.row[store.index.is_sink])

One row per cached token. Image tokens are ViT patches (so a ViT sink is one row even when a
projector merges patches); a patch's vector at an LLM or projector site is that of the token it
became, and NaN where it has none (a patch dropped by unpadding, a CLS token at an LLM site, a
text token at a ViT site). ``llm_pos`` counts from the sample's first non-padding token, so it
does not depend on how samples were batched. The run resumes where a killed run stopped; under
torch.distributed each rank takes the samples with ``sample_idx % world_size == rank``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mechsink.cache.layout import DTYPES, StoreConfig, StoreError
from mechsink.cache.rows import RESERVED_COLUMNS, ROW_COLUMNS
from mechsink.cache.store import Store
from mechsink.cache.writer import StoreWriter
from mechsink.errors import SiteError
from mechsink.sites import Site
from mechsink.batching import prepare
from mechsink.distributed import fail_together
from mechsink.tokens import _AXIS_COLUMNS, ROLE, gather
from mechsink.trace import capture

log = logging.getLogger("mechsink")

# Token selections a store can hold: ViT patches ("image", or only the sinks among them), the
# ViT's special tokens, and LLM positions by role.
TOKENS = ("image", "sinks", "cls", "register", "newline", "text", "answer")
_LLM_ONLY = ("newline", "text", "answer")
_AXES = [c for pair in _AXIS_COLUMNS.values() for c in pair if c != "sample"]


def model_fingerprint(model) -> str:
    """sha256 over the model's config, every parameter's name/shape/dtype and a strided sample of
    up to 1024 of its values (exact bytes): cheap even for 7B models, and changed by any
    re-training, a different checkpoint or a different dtype."""
    h = hashlib.sha256(b"mechsink.model/1\n")
    cfg = model.hf.config.to_dict()
    cfg.pop("transformers_version", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in model.hf.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].cpu().contiguous()
        if sample.dtype == torch.bfloat16:
            sample = sample.view(torch.int16)
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}\n".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def data_key(dataset) -> str:
    """The dataset part of a store's resume key: sha256 over every sample's id, text fields and
    labels, in order - not the image bytes, so that a resume after fixing an unreadable image is
    accepted (and retries it). Changed images are caught per sample by ``image_key``."""
    h = hashlib.sha256(b"mechsink.data-key/1\n")
    h.update(f"{len(dataset)}\n".encode())
    for s in dataset:
        meta = [s.id, s.prompt, s.answer, s.question_type, s.labels]
        h.update(json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return h.hexdigest()


def image_key(sample) -> str | None:
    """sha256 of a sample's image bytes (kept with each cached sample; a resume compares them),
    None when they cannot be read (not a regular file, unreadable)."""
    if sample.image_path is None:
        digest = sample.image_digest()
        return digest if len(digest) == 64 else None
    try:
        if not stat.S_ISREG(os.stat(sample.image_path).st_mode):
            return None
        h = hashlib.sha256()
        with open(sample.image_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def _changed_images(dataset, keys: dict[int, str], done: set[int]) -> list[int]:
    """Cached samples whose image no longer has the bytes it had when it was cached."""
    return [i for i in sorted(done) if i in keys and i < len(dataset) and image_key(dataset[i]) != keys[i]]


def _check_args(model, sites: Sequence[str], tokens: Sequence[str]) -> tuple[list[str], tuple[str, ...]]:
    if isinstance(sites, str):
        sites = [s for s in sites.split(",") if s.strip()]
    if isinstance(tokens, str):
        tokens = [t for t in tokens.split(",") if t.strip()]
    if not sites:
        raise StoreError("no sites to cache; give e.g. sites=['vit.out']")
    names = []
    for s in sites:
        try:
            site = Site.parse(s.strip())
            model.locate(site)
        except SiteError as e:
            raise StoreError(str(e)) from None
        if site.kind == "pattern":
            raise StoreError(f"site {site} holds attention patterns, not one vector per token; cache token states")
        names.append(str(site))
    if len(set(names)) != len(names):
        raise StoreError(f"sites are listed twice: {names}")
    tokens = tuple(dict.fromkeys(t.strip() for t in tokens))
    bad = [t for t in tokens if t not in TOKENS]
    if bad or not tokens:
        raise StoreError(f"unknown token selection {bad or tokens}; choose from {', '.join(TOKENS)}")
    if any(t in _LLM_ONLY for t in tokens) and not any(Site.parse(s).axis == "llm" for s in names):
        raise StoreError(f"tokens {[t for t in tokens if t in _LLM_ONLY]} live only in the LLM; add an llm.* site")
    return names, tokens


# -- rows ------------------------------------------------------------------------------------------
_ROW_COLUMNS = ["sample", "token_role", "image", "tile", "row", "col", *_AXES, "norm", "is_sink"]
_SRC = {"special": 0, "patch": 1, "llm": 2}


def _table(token_map, tokens: Sequence[str]) -> dict[str, np.ndarray]:
    """Every row a selection may hold in this batch, whatever the sinks turn out to be (a "sinks"
    selection holds every patch here), in the order of ``token_rows``, with ``src`` (special /
    patch / llm) and ``idx`` (the row in the TokenMap table it comes from). Numpy columns, no
    DataFrame: this runs once per batch of every extraction."""
    parts: list[dict[str, np.ndarray]] = []
    col = token_map.column
    want = [r for r in ("cls", "register") if r in tokens]
    if want and token_map.size("special"):
        idx = np.flatnonzero(np.isin(col("special", "role"), want))
        parts.append({"token_role": col("special", "role")[idx], "row": -1, "col": -1, "src": _SRC["special"],
                      "idx": idx, **{c: col("special", c)[idx] for c in ("sample", "image", "tile", *_AXES)}})
    if "image" in tokens or "sinks" in tokens:
        parts.append({"token_role": "image", "src": _SRC["patch"], "idx": np.arange(token_map.size("patches")),
                      **{c: col("patches", c) for c in ("sample", "image", "tile", "row", "col", *_AXES)}})
    llm_roles = [r for r in ("newline", "text", "answer") if r in tokens]
    if llm_roles:
        llm: list[dict] = []
        if "newline" in llm_roles:
            nl = np.flatnonzero(col("llm_tokens", "role") == "newline")
            llm.append({"token_role": "newline", **{c: col("llm_tokens", c)[nl] for c in ("sample", "llm_pos", "image",
                                                                                         "tile", "row", "col")}})
        for r in ("text", "answer"):
            if r in llm_roles:
                smp, pos = np.nonzero(token_map.roles == ROLE[r])
                llm.append({"token_role": r, "sample": smp, "llm_pos": pos})
        cat = _concat(llm)
        order = np.lexsort((cat["llm_pos"], cat["sample"]))
        parts.append({**{k: v[order] for k, v in cat.items()}, "src": _SRC["llm"], "idx": -1})
    t = _concat(parts)
    order = np.argsort(t["sample"], kind="stable")
    return {c: t[c][order] for c in [*_ROW_COLUMNS[:-2], "src", "idx"]}


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    """Column-wise concatenation of {column: array or scalar} parts; a missing column is -1."""
    cols = [*_ROW_COLUMNS[:-2], "src", "idx"]
    n = [len(next(v for v in p.values() if isinstance(v, np.ndarray))) for p in parts]
    out = {}
    for c in cols:
        vals = [np.broadcast_to(np.asarray(p.get(c, -1), dtype=object if c == "token_role" else np.int64), (k,))
                for p, k in zip(parts, n)]
        out[c] = np.concatenate(vals) if vals else np.zeros(0, dtype=object if c == "token_role" else np.int64)
    return out


def _pick(table: dict[str, np.ndarray], found: Mapping[str, tuple[np.ndarray, np.ndarray]],
          tokens: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(the columns of ``token_rows``, their positions in ``table``): scores and sink flags from
    ``found`` ({"patch"/"special": (score, is_sink)}, row-aligned with the TokenMap, as
    ``sinks.scores_and_flags`` gives them), sink-only selections cut to the sinks."""
    src, idx = table["src"], table["idx"]
    norm = np.full(len(src), np.nan)
    flag = np.zeros(len(src), dtype=bool)
    for kind in ("special", "patch"):
        at = src == _SRC[kind]
        if at.any():
            norm[at] = np.asarray(found[kind][0], dtype=np.float64)[idx[at]]
            flag[at] = np.asarray(found[kind][1], dtype=bool)[idx[at]]
    rows = {c: table[c] for c in _ROW_COLUMNS[:-2]}
    rows["norm"], rows["is_sink"] = norm, flag
    if "sinks" in tokens and "image" not in tokens:
        at = np.flatnonzero((src != _SRC["patch"]) | flag)
        return {c: v[at] for c, v in rows.items()}, at
    return rows, np.arange(len(src))


def token_rows(token_map, sinks, tokens: Sequence[str]) -> pd.DataFrame:
    """One row per selected token of a batch: sample (in the batch), token_role, image, tile,
    patch_row, patch_col, llm_pos (batch position), the axis columns of mechsink.tokens, norm
    (the sink score at the detection site), is_sink. Order: per sample, special tokens, patches,
    then LLM-only tokens by position."""
    found = {"patch": (sinks.patches["norm"].to_numpy(), sinks.patches["is_sink"].to_numpy()),
             "special": (sinks.special["norm"].to_numpy(), sinks.special["is_sink"].to_numpy())}
    return pd.DataFrame(_pick(_table(token_map, tokens), found, tokens)[0], columns=_ROW_COLUMNS)


def _label_value(v: Any) -> Any:
    """Scalars as they are; lists and dicts as JSON text (one type per parquet column)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "item") and not hasattr(v, "__len__"):
        return v.item()
    return json.dumps(v, sort_keys=True, default=str)


def _label_columns(dataset) -> dict[str, str]:
    """{label key: column name}; keys that clash with store columns get a ``label_`` prefix."""
    keys = list(dataset.label_columns())
    if any(s.question_type is not None for s in dataset):
        keys = ["question_type", *[k for k in keys if k != "question_type"]]
    taken = set(ROW_COLUMNS) | set(RESERVED_COLUMNS)
    return {k: f"label_{k}" if k in taken else k for k in keys}


def _sample_frame(rows: Mapping[str, np.ndarray], token_map, samples: list, idxs: list[int], labels: dict[str, str],
                  llm_classes: np.ndarray | None) -> dict[str, np.ndarray]:
    """The store's row schema (columns) for a batch's token rows."""
    b = np.asarray(rows["sample"])
    pad = token_map.roles == ROLE["pad"]
    start = np.array([int(np.argmin(r)) if r.size and not r.all() else 0 for r in pad], dtype=np.int64)
    llm_pos = np.asarray(rows["llm_pos"])
    vit = np.asarray(rows["is_sink"], dtype=bool)
    llm = llm_classes if llm_classes is not None else np.zeros(len(b), dtype=bool)
    out = {
        "sample_idx": np.asarray(idxs, dtype=np.int64)[b],
        "sample_id": np.array([s.id for s in samples], dtype=object)[b],
        "image_path": np.array([s.image_path or "" for s in samples], dtype=object)[b],
        "token_role": np.asarray(rows["token_role"], dtype=object),
        "image": np.asarray(rows["image"]),
        "tile": np.asarray(rows["tile"]),
        "patch_row": np.asarray(rows["row"]),
        "patch_col": np.asarray(rows["col"]),
        "llm_pos": np.where(llm_pos >= 0, llm_pos - start[b], -1),
        "norm": np.asarray(rows["norm"], dtype=np.float32),
        "is_sink": vit,
        "sink_class": np.select([vit & llm, vit, llm], ["both", "vit", "llm"], "none").astype(object),
    }
    for key, col in labels.items():
        vals = np.empty(len(samples), dtype=object)
        vals[:] = [_label_value(s.question_type if key == "question_type" else s.labels.get(key)) for s in samples]
        out[col] = vals[b]
    return out


# -- reading a batch ---------------------------------------------------------------------------------
def read_rows(model, batch, sites: Sequence[str], tokens: Sequence[str], whole: Sequence[str], dtype: torch.dtype):
    """One forward of ``batch`` for the extractor: ({site: tensor} for ``whole``, (candidate rows,
    {site: [n_candidates, d] in ``dtype``}) for ``sites``).

    ``trace.capture`` gathers every row ``token_rows`` could select (sink flags are not known
    until the detection site has run) and casts it as soon as a site's tensor exists, so no full
    layer output outlives its layer, and the forward stops after the last site. Values are
    bit-identical to gathering from ``model.run``. Sites computed from others
    (``hook_resid_mid``) take ``model.run`` instead; then the second item is None.
    """
    need = list(dict.fromkeys([*sites, *whole]))
    if any(model.locate(s)[1] not in ("input", "output") for s in need):
        return model.run(batch, read=need), None
    cand = _table(batch.token_map, tokens)
    axis = {s: Site.parse(s).axis for s in sites}

    def take(site: str, x: torch.Tensor):
        return (gather(x, axis[site], cand).to(dtype) if site in axis else None, x if site in whole else None)
    got = capture(model, batch.inputs, need, take)
    return ({s: got[s][1] for s in whole}, (cand, {s: got[s][0] for s in sites}))


def _batches(todo, size: int):
    for k in range(0, len(todo), size):
        yield [int(i) for i in todo[k : k + size]]


# -- the extractor ---------------------------------------------------------------------------------
def extract(model, dataset, *, sites: Sequence[str], tokens: Sequence[str] = ("image",), out: str | os.PathLike,
            store_dtype: str = "float16", batch_size: int = 8, sinks=None, prompt: str | None = None,
            shard_rows: int = 8192, shard_bytes: int | None = None, llm_sink_layer: int | None = None,
            llm_sink_dims: Sequence[int] | None = None,
            llm_sink_tau: float = 20.0, errors=None, progress: bool = False) -> Store:
    """Run ``model`` over ``dataset`` and cache ``sites`` for the selected ``tokens`` into ``out``.

    Args:
        model: a mechsink Model (or a name for mechsink.load).
        dataset: a mechsink.data.Dataset (or a spec for open_dataset); sample_idx = its order.
        sites: site names, e.g. ["vit.out", "llm.blocks.2.hook_resid_post"] (not attention patterns).
        tokens: any of TOKENS: "image" (every ViT patch), "sinks" (sink patches only), "cls",
            "register", "newline", "text", "answer".
        out: store directory; an existing store made with the same settings resumes (the
            settings, sample ids and prompts, not the image bytes: images skipped as unreadable
            are retried, and an image changed since it was cached is refused in one line).
        store_dtype: storage dtype: "float16", "bfloat16" or "float32".
        shard_rows, shard_bytes: a shard is cut at this many rows or tensor bytes (default 256 MiB).
        sinks: how ViT sinks are detected (a SinkSpec; default SinkSpec()); fills norm / is_sink.
        prompt: question for every image (default: each sample's own, else the model's default).
        llm_sink_layer, llm_sink_dims, llm_sink_tau: also flag LLM-emerged sinks (Kang et al.:
            max over dims of |RMS-normalised hidden state| >= tau at llm.blocks.{layer}) so that
            sink_class can be "llm" or "both"; dims are required (see mechsink.sinks.massive_dims).
        errors: a mechsink.data.ErrorLog to collect unreadable images (also written to
            out/errors.jsonl); those samples are retried on resume.
    Returns the finished Store (on every rank under torch.distributed).
    """
    from mechsink import load
    from mechsink.data import ErrorLog, ImageError, open_dataset
    from mechsink.sinks import SinkSpec, calibrate, kang_score
    from mechsink.sinks.detect import scores_and_flags

    if not hasattr(model, "prepare"):
        model = load(model)
    if not hasattr(dataset, "fingerprint"):
        dataset = open_dataset(dataset)
    if store_dtype not in DTYPES:
        raise StoreError(f"store_dtype must be one of {sorted(DTYPES)}, got {store_dtype!r}")
    if batch_size < 1:
        raise StoreError(f"batch_size must be >= 1, got {batch_size}")
    sites, tokens = _check_args(model, sites, tokens)
    spec = sinks if sinks is not None else SinkSpec()
    if isinstance(spec, str):
        spec = SinkSpec.preset(spec)
    llm_site = None
    if llm_sink_layer is not None:
        if not llm_sink_dims:
            raise StoreError("llm_sink_layer needs llm_sink_dims (find them with mechsink.sinks.massive_dims)")
        llm_site = f"llm.blocks.{int(llm_sink_layer)}.hook_resid_post"
        try:
            model.locate(llm_site)
        except SiteError as e:
            raise StoreError(str(e)) from None
        llm_sink_dims = sorted({int(d) for d in llm_sink_dims})
    errors = errors if errors is not None else ErrorLog()

    def load_images(idxs: list[int]):
        kept = []
        for i in idxs:
            errors.n_seen += 1
            s = dataset[i]
            try:
                kept.append((i, s, s.load_image()))
            except ImageError as e:
                log.warning("skipping sample %r: %s", s.id, e)
                errors.add(s.id, s.image_path, e)
        return kept

    def prepared(loaded):
        """(the loaded entries the processor took, their Batch); refused images are listed."""
        if not loaded:
            return [], None
        chunk = prepare(model, [(s, im) for _, s, im in loaded], answers=False, prompt=prompt, errors=errors)
        if chunk is None:
            return [], None
        kept = {id(s) for s in chunk.samples}
        return [e for e in loaded if id(e[1]) in kept], chunk.batch

    if spec.rule == "quantile" and spec.params.get("tau") is None:
        all_idx = np.arange(len(dataset), dtype=np.int64)
        batches = (b for c in _batches(all_idx, batch_size) if (kept := load_images(c))
                   for b in [prepared(kept)[1]] if b is not None)
        spec = calibrate(model, batches, spec.replace(rule="relative"), q=spec.params["q"])
        errors.records.clear()
        errors.n_seen = 0

    config = StoreConfig(
        sites=tuple(sites), tokens=tokens, model=str(model.source), model_hash=model_fingerprint(model),
        data=data_key(dataset),
        params={"sinks": spec.to_dict(), "prompt": prompt, "llm_pos": "from first non-padding token",
                "llm_sinks": None if llm_site is None else
                {"site": llm_site, "dims": llm_sink_dims, "tau": float(llm_sink_tau)}},
    )
    writer = StoreWriter(out, config, shard_rows=shard_rows, dtype=store_dtype,
                         **({} if shard_bytes is None else {"shard_bytes": shard_bytes}))
    labels = _label_columns(dataset)
    done = writer.done_samples()
    changed = _changed_images(dataset, writer.sample_keys(), done)
    if changed:
        writer.close()
        first = dataset[changed[0]]
        raise StoreError(
            f"{len(changed)} image(s) changed since they were cached in {out} (first: sample {first.id!r}, "
            f"{first.image_path or 'in-memory image'}); restore them, or cache into a new directory")
    mine = np.arange(writer.rank, len(dataset), writer.world_size, dtype=np.int64)
    todo = mine[~done.contains(mine)]          # an int64 array: a list of ints costs ~36 bytes per sample
    whole = [spec.site, *([llm_site] if llm_site else [])]     # read in full: detection needs every token
    cast = DTYPES[store_dtype]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=f"cache {Path(out).name}", unit="sample")
    # a rank that fails raises on every rank, instead of leaving the others at finalize's barrier
    with fail_together(), writer:
        for chunk in _batches(todo, batch_size):
            loaded, batch = prepared(load_images(chunk))
            if batch is not None:
                acts, taken = read_rows(model, batch, sites, tokens, whole, cast)
                found = scores_and_flags(acts, batch.token_map, spec)
                rows, at = _pick(taken[0] if taken is not None else _table(batch.token_map, tokens), found, tokens)
                llm_flags = None
                if llm_site is not None:
                    h = gather(acts[llm_site], "llm", rows)
                    llm_flags = (kang_score(h, llm_sink_dims) >= llm_sink_tau).cpu().numpy()
                frame = _sample_frame(rows, batch.token_map, [s for _, s, _ in loaded], [i for i, _, _ in loaded],
                                      labels, llm_flags)
                if taken is None:
                    tensors = {s: gather(acts[s], Site.parse(s).axis, rows).to(cast) for s in sites}
                else:
                    got = taken[1]
                    whole_table = len(at) == len(taken[0]["sample"])
                    at = torch.as_tensor(at)
                    tensors = {s: got[s] if whole_table else got[s][at.to(got[s].device)]
                               for s in sites}   # the writer copies to host
                writer.add(frame, tensors, samples=[i for i, _, _ in loaded],
                           keys={i: k for i, s, _ in loaded if (k := image_key(s)) is not None})
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    errors_file = Path(out) / ("errors.jsonl" if writer.world_size == 1 else f"errors.r{writer.rank:02d}.jsonl")
    if len(errors):
        errors.write(errors_file)
    else:    # a resume that read every image: the list of an earlier run is out of date
        errors_file.unlink(missing_ok=True)
    return writer.finalize()
