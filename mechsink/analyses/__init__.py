"""The paper's analyses of what ViT sinks encode and how much the LLM needs them.

- :mod:`.relevance` -- a token's ViT attention over the patch grid, with spread numbers.
- :mod:`.decoding`  -- words read through the LM head from one isolated visual token.
- :mod:`.subsets`   -- sink-only / non-sink-only / every image token as visual input, per question type.
- :mod:`.scoring`   -- per-sample correctness and accuracy tables (shared with the interventions).
- :mod:`.tokens`    -- the token sets these analyses take (``image``, ``sinks``, ``nonsinks``).
- :mod:`.errors`    -- ``AnalysisError``.

Each takes a Config (``RelevanceConfig``, ``DecodingConfig``, ``SubsetConfig``) or its fields as
keywords and returns a :class:`mechsink.results.Result`; figures are in :mod:`mechsink.report.figures`.
Attention received by ViT-norm bin lives with the other attention statistics in
:mod:`mechsink.sinks.attention` (``norm_bins``).
"""
from .decoding import DecodingConfig, DecodingResult, decode_isolated, decoding_summary
from .errors import AnalysisError
from .relevance import RelevanceConfig, RelevanceMaps, relevance_acts, relevance_maps, spread_stats
from .scoring import accuracy_table, answer_scores
from .subsets import SUBSETS, SubsetConfig, SubsetResult, removal_masks, subset_scores, visual_subsets
from .tokens import TOKEN_SETS

__all__ = ["AnalysisError", "DecodingConfig", "DecodingResult", "RelevanceConfig", "RelevanceMaps", "SUBSETS",
           "SubsetConfig", "SubsetResult", "TOKEN_SETS", "accuracy_table", "answer_scores", "decode_isolated",
           "decoding_summary", "relevance_acts", "relevance_maps", "removal_masks", "spread_stats", "subset_scores",
           "visual_subsets"]
