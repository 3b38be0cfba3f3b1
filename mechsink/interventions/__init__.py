"""Interventions on the visual tokens: reordering them (sink-to-the-front) and DIYSink."""
from .diysink import (DualProjector, QuestionEncoder, Reweighter, ReweightPolicy, RuleRouter, evaluate_dual,
                      lm_loss, mean_loss, route, train_dual, train_reweighter)
from .reorder import ORDERS, POSITIONS, ReorderResult, evaluate_reorder, permutation, reorder_inputs, reordered_logits

__all__ = ["DualProjector", "ORDERS", "POSITIONS", "QuestionEncoder", "ReorderResult", "ReweightPolicy", "Reweighter",
           "RuleRouter", "evaluate_dual", "evaluate_reorder", "lm_loss", "mean_loss", "permutation",
           "reorder_inputs", "reordered_logits", "route", "train_dual", "train_reweighter"]
