"""Interventions on the visual tokens: reordering them (sink-to-the-front) and DIYSink."""
from .diysink import (DualEvalConfig, DualProjector, DualResult, DualTrainConfig, QuestionEncoder, ReweightConfig,
                      Reweighter, ReweightPolicy, RuleRouter, evaluate_dual, lm_loss, mean_loss, route, train_dual,
                      train_reweighter)
from .reorder import (ORDERS, POSITIONS, ReorderConfig, ReorderResult, evaluate_reorder, permutation, reorder_inputs,
                      reordered_logits)

__all__ = ["DualEvalConfig", "DualProjector", "DualResult", "DualTrainConfig", "ORDERS", "POSITIONS", "QuestionEncoder",
           "ReorderConfig", "ReorderResult", "ReweightConfig", "ReweightPolicy", "Reweighter", "RuleRouter",
           "evaluate_dual", "evaluate_reorder", "lm_loss", "mean_loss", "permutation", "reorder_inputs",
           "reordered_logits", "route", "train_dual", "train_reweighter"]
