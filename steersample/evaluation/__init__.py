"""Evaluation: how samples are judged.

``metrics`` (ratio copy test, data-copying test, precision/recall), the independent judge
(``judge``: digits, letters; ``judge_for(info)``) and the audit of steering methods
(``audit``). Built on everything below.
"""

from __future__ import annotations

from steersample._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Method": "steersample.evaluation.audit",
    "default_grid": "steersample.evaluation.audit",
    "quick_grid": "steersample.evaluation.audit",
    "MethodResult": "steersample.evaluation.audit",
    "AuditResult": "steersample.evaluation.audit",
    "run_audit": "steersample.evaluation.audit",
    "select_best": "steersample.evaluation.audit",
    "targets": "steersample.evaluation.audit",
    "meets_bands": "steersample.evaluation.audit",
    "BANDS": "steersample.evaluation.audit",
    "BEST_STRENGTH": "steersample.evaluation.audit",
    "REFERENCE_FREE": "steersample.evaluation.audit",
    "DETECTOR_FRACTIONS": "steersample.evaluation.audit",
    "FEATURE_DIM": "steersample.evaluation.judge",
    "ClassJudgement": "steersample.evaluation.judge",
    "JudgeReport": "steersample.evaluation.judge",
    "class_accuracy": "steersample.evaluation.judge",
    "classify": "steersample.evaluation.judge",
    "copy_flags": "steersample.evaluation.judge",
    "digit_features": "steersample.evaluation.judge",
    "diversity": "steersample.evaluation.judge",
    "frechet_distance": "steersample.evaluation.judge",
    "judge": "steersample.evaluation.judge",
    "judge_classifier": "steersample.evaluation.judge",
    "Judge": "steersample.evaluation.judge",
    "judge_for": "steersample.evaluation.judge",
    "digits_judge": "steersample.evaluation.judge",
    "letters_judge": "steersample.evaluation.judge",
    "COPY_THRESHOLD": "steersample.evaluation.metrics",
    "nn_ratio": "steersample.evaluation.metrics",
    "copy_rate": "steersample.evaluation.metrics",
    "data_copying": "steersample.evaluation.metrics",
    "DataCopying": "steersample.evaluation.metrics",
    "precision_recall": "steersample.evaluation.metrics",
    "PrecisionRecall": "steersample.evaluation.metrics",
    "relative_distance": "steersample.evaluation.metrics",
    "nearest_training_distance": "steersample.evaluation.metrics",
    "novelty_by_class": "steersample.evaluation.novelty",
    "z_u": "steersample.evaluation.novelty",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
