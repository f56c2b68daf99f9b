"""Steering: the steerer registry and the steerers the loop calls.

``registry`` (``STEERERS``, ``make_steerer``, ``resolve_steering``), ``AttractorRepulsion``
(``attractor``, its hull geometry in ``hull``), ``RepresentationSteering``
(``representation``) and memorisation detectors (``detect``). Built on ``sampling``.
"""

from __future__ import annotations

from steersample._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "AttractorRepulsion": "steersample.steering.attractor",
    "AttractorRun": "steersample.steering.attractor",
    "Flags": "steersample.steering.attractor",
    "REFINEMENT_TOP1": "steersample.steering.attractor",
    "SLIDE_RATIO": "steersample.steering.attractor",
    "GaussianClassModel": "steersample.steering.class_model",
    "ConditionalDeviation": "steersample.steering.detect",
    "SpikinessDetector": "steersample.steering.detect",
    "PosteriorConcentration": "steersample.steering.detect",
    "DETECTORS": "steersample.steering.detect",
    "score_matrix": "steersample.steering.detect",
    "aggregate": "steersample.steering.detect",
    "auroc": "steersample.steering.detect",
    "tpr_at_fpr": "steersample.steering.detect",
    "DetectionPoint": "steersample.steering.detect",
    "detection_curve": "steersample.steering.detect",
    "HULL_ITERATIONS": "steersample.steering.hull",
    "DENSE_SEARCH_ELEMENTS": "steersample.steering.hull",
    "nearest": "steersample.steering.hull",
    "project_capped_simplex": "steersample.steering.hull",
    "project_to_capped_hull": "steersample.steering.hull",
    "project_to_capped_hull_caps": "steersample.steering.hull",
    "span_basis": "steersample.steering.hull",
    "class_neighbour_count": "steersample.steering.hull",
    "NoveltySteering": "steersample.steering.novelty",
    "NoveltyRun": "steersample.steering.novelty",
    "leave_one_out_distances": "steersample.steering.novelty",
    "push_along": "steersample.steering.novelty",
    "push_to_distance": "steersample.steering.novelty",
    "recommended_steering": "steersample.steering.recommended",
    "recommended_for_scale": "steersample.steering.recommended",
    "RECOMMENDED_STRENGTH": "steersample.steering.recommended",
    "SteeringOutput": "steersample.steering.registry",
    "Steerer": "steersample.steering.registry",
    "NoSteering": "steersample.steering.registry",
    "STEERERS": "steersample.steering.registry",
    "register_steerer": "steersample.steering.registry",
    "make_steerer": "steersample.steering.registry",
    "resolve_steering": "steersample.steering.registry",
    "spikiness": "steersample.steering.representation",
    "l4_over_l2": "steersample.steering.representation",
    "block_names": "steersample.steering.representation",
    "resolve_layers": "steersample.steering.representation",
    "image_tokens": "steersample.steering.representation",
    "damp": "steersample.steering.representation",
    "hooked": "steersample.steering.representation",
    "RepresentationRun": "steersample.steering.representation",
    "RepresentationSteering": "steersample.steering.representation",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
