"""ViT attention sinks: detection rules, massive-activation dims, LLM sink classes, attention statistics.

    from mechsink.sinks import SinkSpec, detect
    sinks = detect(model, batch)                          # default relative rule at vit.out
    sinks = detect(model, batch, SinkSpec.preset("llava-1.5"))
"""
from .attention import (AttentionConfig, AttentionStats, attention_stats, llm_attention, llm_attention_acts, norm_bins,
                        sink_ratio, vit_attention, vit_attention_acts)
from .detect import (PRESETS, SinkSet, SinkSpec, calibrate, calibrate_acts, candidate_scores, detect, detect_acts,
                     detect_dataset, score_tokens)
from .llm import CLASSES, SinkClasses, classify_acts, kang_score, rms_normalize, sink_classes
from .massive import massive_dims, scan_massive, top_dims
from .rules import RULES, QuantileSketch, SinkError

__all__ = [
    "CLASSES", "PRESETS", "RULES", "QuantileSketch", "SinkClasses", "SinkError", "SinkSet", "SinkSpec",
    "calibrate", "calibrate_acts", "candidate_scores", "classify_acts", "detect", "detect_acts", "kang_score",
    "llm_attention", "llm_attention_acts", "massive_dims", "norm_bins", "rms_normalize", "scan_massive",
    "detect_dataset", "score_tokens", "sink_classes", "sink_ratio", "top_dims", "vit_attention", "vit_attention_acts",
]
