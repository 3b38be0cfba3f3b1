"""Linear probes on cached activations: what do sink tokens encode, compared with the rest?

    cfg = ProbeConfig(label="planted_label")                # token sets sinks, nonsinks, cls, mean
    res = probe(Store.open("cache/"), cfg, out="probe_out/")
    res.frame                                               # one row per (token set, site)
    res.probes["sinks", "vit.out"].predict(x)               # the probe refit on every image
    mechsink.report.figures.probe_figure(res)               # accuracy by layer per token set

A label is *image-level* when it is constant within each sample (a class, an attribute) and
*patch-level* otherwise (what or where the patch is, e.g. ``patch_row``). Token sets are token
selections (:mod:`mechsink.selection`) and one aggregate:

- ``sinks`` / ``nonsinks`` / ``image``: every image token (``is_sink`` true / false / either) is one
  training sample. For an image-level label the test images are scored by averaging their tokens'
  predicted probabilities (ridge: decision scores) — the ``aggregate`` column says which — and the
  token-level score is reported too (``token_accuracy``).
- ``cls``: CLS rows (image-level labels only).
- ``mean``: an aggregate, not a selection: the mean of each image's image tokens, one sample per
  image (image-level labels only).

Every split is grouped by image: images (``image_path`` when the cache records it, so one picture
asked several questions stays on one side; else the sample) are dealt into k folds once, and every
token set and site uses those folds, so their scores are paired. The score is balanced accuracy with
a bootstrap CI over images. The control task (Hewitt & Liang) gives each image a random label from
the token set's label distribution (image-level: the images' labels shuffled across images;
patch-level: each (image, label) pair mapped to a random label), fixed across sites; with
image-grouped splits a probe can only beat chance on it by memorising images, so a control above
chance flags leakage or an over-expressive probe. ``selectivity`` = accuracy - control accuracy.
``majority`` is the balanced accuracy of predicting the training folds' most frequent class.

Probes are saved as safetensors (weight [K, d], bias [K]) + JSON (classes, site, label, config):
the feature standardisation is folded into the weights, so a saved probe is one affine map.

Memory does not grow with the cache. The index is read in blocks, several times over, and what the
probe keeps of it is per image, per sample or per class (names, folds, control tables, counts).
A token set's per-token arrays (index row, class code, sample, image: ~17 bytes a token) are held
while they fit ``probe(..., memory_mb=1024)`` and spilled to a scratch folder (``TMPDIR``) past it;
a (token set, site)'s features are held (a float16 store's as float16, else float32) when they
fit the same budget, else read from the store block by block on every pass of the fit, which is
sklearn's (lbfgs ``LogisticRegression`` / ``RidgeClassifier``) computed over blocks whose size
depends on the width only. Either way, under any budget, it is the same probe.
``max_tokens_per_image`` keeps a uniform draw of k of an image's tokens, seeded by the seed and the
image, so that it too is drawn chunk by chunk.

Modules, in dependency order: :mod:`.config` (ProbeConfig, token-set names), :mod:`.linear`
(LinearProbe, saving), :mod:`.labels` (the label's classes and level, images, folds: index scans),
:mod:`.columns` (per-token arrays, held or spilled), :mod:`.sets` (token sets, control labels,
blocks of rows), :mod:`.features` (the feature source), :mod:`.fit` (the blockwise fit),
:mod:`.scoring` (balanced accuracy, cross-validation as counts), :mod:`.result` (ProbeResult),
:mod:`.run` (``probe``).
"""
from .config import AGGREGATES, LEVELS, MODELS, SELECTIONS, TOKEN_SETS, ProbeConfig, ProbeError
from .fit import fit_linear
from .linear import PROBE_FORMAT, LinearProbe, load_probe
from .result import RESULT_COLUMNS, SPLIT_COLUMNS, ProbeResult, probe_name
from .run import probe
from .scoring import balanced_accuracy_ci

__all__ = ["AGGREGATES", "LEVELS", "MODELS", "PROBE_FORMAT", "RESULT_COLUMNS", "SELECTIONS", "SPLIT_COLUMNS",
           "TOKEN_SETS", "LinearProbe", "ProbeConfig", "ProbeError", "ProbeResult", "balanced_accuracy_ci",
           "fit_linear", "load_probe", "probe", "probe_name"]
