"""The paper's analyses of what ViT sinks encode and how much the LLM needs them.

- :mod:`.relevance` -- a token's ViT attention over the patch grid, with spread numbers.
- :mod:`.decoding`  -- words read through the LM head from one isolated visual token.
- :mod:`.subsets`   -- sink-only / non-sink-only / full visual input, per question type.
- :mod:`.scoring`   -- answer batches, per-sample correctness and accuracy tables (shared).

Attention received by ViT-norm bin lives with the other attention statistics in
:mod:`mechsink.sinks.attention` (``norm_bins``).
"""
from .decoding import decode_isolated, decoding_summary
from .relevance import AnalysisError, RelevanceMaps, draw_map, relevance_acts, relevance_maps, spread_stats
from .scoring import accuracy_table, answer_batches, answer_scores
from .subsets import SUBSETS, SubsetResult, removal_masks, subset_scores, visual_subsets

__all__ = ["AnalysisError", "RelevanceMaps", "SUBSETS", "SubsetResult", "accuracy_table", "answer_batches",
           "answer_scores", "decode_isolated", "decoding_summary", "draw_map", "relevance_acts", "relevance_maps",
           "removal_masks", "spread_stats", "subset_scores", "visual_subsets"]
