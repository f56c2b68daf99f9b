"""An independent judge of generated 8x8 digits: accuracy, Frechet distance, diversity, copies.

Nothing here depends on the generator: the judge is fitted on scikit-learn's bundled digits
only (all 1,797 images, scaled to [-1, 1] as in ``steersample.data.load_digits``).

Samples are tensors ``(B, 1, 8, 8)`` (or ``(B, 64)``) in the model's pixel range [-1, 1].

- **Class accuracy**: an RBF support-vector classifier, ``sklearn.svm.SVC(C=10,
  gamma="scale")``, trained on all 1,797 digits (5-fold stratified cross-validated accuracy on
  the digits: about 0.989). ``classify`` returns its predicted labels.
- **Frechet distance** in a fixed feature space: the first ``FEATURE_DIM`` = 16 principal
  components of all 1,797 digits (``sklearn.decomposition.PCA``, full SVD, no whitening,
  pixels in [-1, 1]). With means mu and covariances S of the two feature sets::

      FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))

  computed in float64. Small sample sets bias FD upwards; compare FDs of equal sample counts.
- **Diversity**: mean pairwise l2 distance between samples (pixel space, distinct pairs).
- **Copies**: the ratio test of ``steersample.evaluation.metrics`` against a reference set (the training
  set), ``d(x, NN1) / d(x, NN2) < 1/3``; a training image itself has d(NN1) = 0, so ratio 0.

``judge(samples, labels, reference, held_out, held_out_labels)`` gathers everything per class in
a ``JudgeReport``.

**Other testbeds.** A :class:`Judge` bundles the classifier, the feature PCA and the data both were
fitted on for one testbed, with the same measures as methods. ``judge_for(info)`` picks it from a
model folder's metadata (``steersample.default.load_default_info(...).testbed``):

- ``digits``: :func:`digits_judge`, exactly the module-level functions above (same fitted objects);
- ``letters``: :func:`letters_judge`, the same recipe (``SVC(C=10, gamma="scale")``, 16-d PCA,
  full SVD) fitted on every letter ``steersample.letters.render_letters`` draws (all 22 fonts x 8
  variants, render seed 0, pixels in [-1, 1]: 1,760 images of 16x16), labels in the order of the
  model's class names (metadata's ``letters``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

__all__ = [
    "FEATURE_DIM",
    "ClassJudgement",
    "Judge",
    "JudgeReport",
    "class_accuracy",
    "classify",
    "copy_flags",
    "digit_features",
    "digits_judge",
    "diversity",
    "frechet_distance",
    "judge",
    "judge_classifier",
    "judge_for",
    "letters_judge",
]

FEATURE_DIM = 16
_PIXELS = 64


# ----------------------------------------------------------------------------- fitted parts
@lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from steersample.data import load_digits

    images, labels = load_digits()
    return images.reshape(len(images), _PIXELS).double().numpy(), labels.numpy()


@lru_cache(maxsize=1)
def judge_classifier():
    """The judge's classifier: ``SVC(C=10, gamma="scale")`` fitted on all 1,797 digits in [-1, 1]."""
    from sklearn.svm import SVC

    x, y = _all_digits()
    return SVC(C=10.0, gamma="scale").fit(x, y)


@lru_cache(maxsize=1)
def _pca():
    from sklearn.decomposition import PCA

    x, _ = _all_digits()
    return PCA(n_components=FEATURE_DIM, svd_solver="full").fit(x)


def _flat(samples: torch.Tensor | np.ndarray, name: str = "samples") -> np.ndarray:
    """(B, 1, 8, 8) / (B, 8, 8) / (B, 64) tensor or array -> float64 array (B, 64)."""
    return _flat_pixels(samples, name, (8, 8), "digits")


def _flat_pixels(samples: torch.Tensor | np.ndarray, name: str, side: tuple[int, int],
                 noun: str) -> np.ndarray:
    """(B, 1, H, W) / (B, H, W) / (B, H*W) tensor or array -> float64 array (B, H*W)."""
    pixels = side[0] * side[1]
    if isinstance(samples, torch.Tensor):
        if not samples.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor in [-1, 1], got dtype {samples.dtype}")
        samples = samples.detach().to("cpu", torch.float64).numpy()
    elif isinstance(samples, np.ndarray):
        samples = samples.astype(np.float64, copy=False)
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(samples).__name__}")
    if samples.ndim < 2 or samples[0].size != pixels:
        h, w = side
        raise ValueError(
            f"{name} must hold {h}x{w} {noun}, shape (B, 1, {h}, {w}) or (B, {pixels}); "
            f"got {samples.shape}"
        )
    flat = samples.reshape(len(samples), pixels)
    if not np.isfinite(flat).all():
        raise ValueError(f"{name} contains NaN or inf; the judge needs finite pixels in [-1, 1]")
    return flat


# ----------------------------------------------------------------------------- measures
def classify(samples: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Judge's predicted class ``(B,)`` int64 for samples ``(B, 1, 8, 8)`` in [-1, 1]."""
    return digits_judge().classify(samples)


def class_accuracy(samples: torch.Tensor | np.ndarray, labels: torch.Tensor) -> float:
    """Share of samples the judge reads as their intended class ``labels`` ``(B,)``."""
    return digits_judge().class_accuracy(samples, labels)


def digit_features(samples: torch.Tensor | np.ndarray) -> np.ndarray:
    """The fixed FD feature space: first 16 PCA coordinates of all digits, ``(B, 16)`` float64."""
    return digits_judge().features(samples)


def _sqrtm_psd_product(a: np.ndarray, b: np.ndarray) -> float:
    """tr((A B)^(1/2)) for symmetric PSD A, B, as tr((A^(1/2) B A^(1/2))^(1/2)) (stable)."""
    wa, va = np.linalg.eigh(a)
    root_a = (va * np.sqrt(np.clip(wa, 0.0, None))) @ va.T
    m = root_a @ b @ root_a
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _frechet(fa: np.ndarray, fb: np.ndarray) -> float:
    if len(fa) < 2 or len(fb) < 2:
        raise ValueError(
            f"Frechet distance needs at least 2 samples on each side; got {len(fa)} and {len(fb)}"
        )
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    cov_a, cov_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
    fd -= 2.0 * _sqrtm_psd_product(cov_a, cov_b)
    return float(max(fd, 0.0))


def frechet_distance(samples: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """FD between two digit sets (each ``(B, 1, 8, 8)``, at least 2) in the PCA feature space."""
    return digits_judge().frechet_distance(samples, reference)


def _diversity(x: np.ndarray) -> float:
    if len(x) < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {len(x)}")
    sq = (x**2).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0, None)
    iu = np.triu_indices(len(x), k=1)
    return float(np.sqrt(d2[iu]).mean())


def diversity(samples: torch.Tensor | np.ndarray) -> float:
    """Mean l2 distance over distinct pairs of samples (pixel space); needs at least 2."""
    return _diversity(_flat(samples))


def copy_flags(samples: torch.Tensor, reference) -> torch.Tensor:
    """``(B,)`` bool: ``metrics.nn_ratio(samples, reference) < 1/3`` (the ratio test)."""
    from steersample.evaluation.metrics import COPY_THRESHOLD, nn_ratio

    return nn_ratio(torch.as_tensor(samples, dtype=reference.latents.dtype), reference) < COPY_THRESHOLD


# ----------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class ClassJudgement:
    """Judge's figures for the samples of one class (``fd`` is None with fewer than 2 samples)."""

    label: int
    count: int
    copy_rate: float
    accuracy: float
    fd: float | None
    diversity: float | None


@dataclass(frozen=True)
class JudgeReport:
    """Per-class judgements plus pooled figures over all samples given."""

    per_class: tuple[ClassJudgement, ...]
    copy_rate: float
    accuracy: float
    fd: float | None
    copy: torch.Tensor  # (B,) bool, the ratio-test flags
    ratio: torch.Tensor  # (B,) float64, d1/d2 against the reference set
    predicted: torch.Tensor  # (B,) int64, the judge classifier's labels

    def for_classes(self, classes) -> dict[str, float]:
        """Mean copy rate / accuracy over the given classes (weighted by sample count)."""
        rows = [r for r in self.per_class if r.label in set(int(c) for c in classes)]
        n = sum(r.count for r in rows)
        if n == 0:
            return {"copy_rate": float("nan"), "accuracy": float("nan"), "count": 0}
        return {"copy_rate": sum(r.copy_rate * r.count for r in rows) / n,
                "accuracy": sum(r.accuracy * r.count for r in rows) / n, "count": n}


def judge(samples: torch.Tensor, labels: torch.Tensor, reference,
          held_out: torch.Tensor | None = None,
          held_out_labels: torch.Tensor | None = None) -> JudgeReport:
    """Judge samples ``(B, 1, 8, 8)`` in [-1, 1] generated for ``labels`` ``(B,)``.

    ``reference`` is the training ``ReferenceSet`` (copy test). ``held_out`` / ``held_out_labels``
    are the real digits the model never saw (FD reference, per class and pooled); FD is None when
    they are not given. Other testbeds: ``judge_for(info).judge(...)``.
    """
    return digits_judge().judge(samples, labels, reference, held_out, held_out_labels)


# ----------------------------------------------------------------------------- per testbed
@dataclass(frozen=True, eq=False)
class Judge:
    """The independent judge of one testbed: a classifier and a ``FEATURE_DIM``-d PCA, both
    fitted on ``images`` / ``labels`` (real images of every class, pixels in [-1, 1]), and the
    measures of this module on samples of ``side`` (H, W) pixels.

    ``name`` is the testbed (``"digits"``, ``"letters"``); ``class_names[i]`` names label ``i``;
    ``noun`` is what the images are ("digits", "letters"), for messages and reports.
    """

    name: str
    side: tuple[int, int]
    classifier: Any
    pca: Any
    images: np.ndarray  # (N, H*W) float64
    labels: np.ndarray  # (N,) int
    class_names: tuple[str, ...]
    noun: str

    def flat(self, samples: torch.Tensor | np.ndarray, name: str = "samples") -> np.ndarray:
        """Samples ``(B, 1, H, W)`` / ``(B, H, W)`` / ``(B, H*W)`` -> float64 ``(B, H*W)``, checked."""
        return _flat_pixels(samples, name, self.side, self.noun)

    def classify(self, samples: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Predicted class ``(B,)`` int64."""
        x = self.flat(samples)
        if len(x) == 0:
            return torch.empty(0, dtype=torch.int64)
        return torch.as_tensor(self.classifier.predict(x), dtype=torch.int64)

    def class_accuracy(self, samples: torch.Tensor | np.ndarray, labels: torch.Tensor) -> float:
        """Share of samples read as their intended class ``labels`` ``(B,)``."""
        labels = torch.as_tensor(labels).reshape(-1).cpu().long()
        pred = self.classify(samples)
        if len(pred) != len(labels) or len(pred) == 0:
            raise ValueError(
                f"need one label per sample and at least one sample; got {len(pred)} samples and "
                f"{len(labels)} labels"
            )
        return float((pred == labels).double().mean())

    def features(self, samples: torch.Tensor | np.ndarray) -> np.ndarray:
        """The FD feature space: ``(B, FEATURE_DIM)`` float64 PCA coordinates."""
        return self.pca.transform(self.flat(samples))

    def frechet_distance(self, samples, reference) -> float:
        """FD between two image sets (at least 2 each) in the PCA feature space."""
        return _frechet(self.features(samples), self.features(reference))

    def diversity(self, samples) -> float:
        """Mean l2 distance over distinct pairs of samples (pixel space); needs at least 2."""
        return _diversity(self.flat(samples))

    def judge(self, samples: torch.Tensor, labels: torch.Tensor, reference,
              held_out: torch.Tensor | None = None,
              held_out_labels: torch.Tensor | None = None) -> JudgeReport:
        """Per-class and pooled figures for ``samples`` generated for ``labels`` (see the
        module-level :func:`judge`)."""
        samples = torch.as_tensor(samples).detach().cpu().float()
        labels = torch.as_tensor(labels).reshape(-1).cpu().long()
        if samples.shape[0] != labels.shape[0]:
            raise ValueError(f"got {samples.shape[0]} samples but {labels.shape[0]} labels")
        from steersample.evaluation.metrics import COPY_THRESHOLD, nn_ratio

        ratio = nn_ratio(samples.to(reference.latents.dtype), reference)
        copy = ratio < COPY_THRESHOLD
        predicted = self.classify(samples)
        rows = []
        for c in torch.unique(labels).tolist():
            m = labels == c
            fd = None
            if held_out is not None and int(m.sum()) >= 2:
                ref_c = held_out[torch.as_tensor(held_out_labels).reshape(-1) == c]
                fd = self.frechet_distance(samples[m], ref_c) if len(ref_c) >= 2 else None
            rows.append(ClassJudgement(
                label=int(c), count=int(m.sum()), copy_rate=float(copy[m].double().mean()),
                accuracy=float((predicted[m] == c).double().mean()), fd=fd,
                diversity=self.diversity(samples[m]) if int(m.sum()) >= 2 else None))
        pooled_fd = None
        if held_out is not None and len(samples) >= 2:
            pooled_fd = self.frechet_distance(samples, held_out)
        return JudgeReport(per_class=tuple(rows), copy_rate=float(copy.double().mean()),
                           accuracy=float((predicted == labels).double().mean()), fd=pooled_fd,
                           copy=copy, ratio=ratio, predicted=predicted)


@lru_cache(maxsize=1)
def digits_judge() -> Judge:
    """The digits judge: :func:`judge_classifier` and the PCA of all 1,797 digits (the objects
    the module-level functions use)."""
    x, y = _all_digits()
    return Judge(name="digits", side=(8, 8), classifier=judge_classifier(), pca=_pca(),
                 images=x, labels=y, class_names=tuple(str(c) for c in range(10)), noun="digits")


LETTERS_RENDER_SEED = 0
LETTERS_VARIANTS = 8


def letters_judge(letters: tuple[str, ...] | None = None) -> Judge:
    """The letters judge: ``SVC(C=10, gamma="scale")`` and a 16-d PCA (full SVD) fitted on every
    rendering of ``render_letters(seed=0, variants=8, letters=letters)`` (all fonts; default
    letters ``steersample.letters.LETTERS``), label ``i`` = ``letters[i]``."""
    from steersample.letters import LETTERS

    return _letters_judge(LETTERS if letters is None else tuple(str(c) for c in letters))


@lru_cache(maxsize=4)
def _letters_judge(letters: tuple[str, ...]) -> Judge:
    from sklearn.decomposition import PCA
    from sklearn.svm import SVC

    from steersample.letters import LETTER_SIZE, render_letters

    images, labels, _ = render_letters(seed=LETTERS_RENDER_SEED, variants=LETTERS_VARIANTS,
                                       letters=letters)
    x = images.reshape(len(images), -1).double().numpy()
    y = labels.numpy()
    return Judge(name="letters", side=(LETTER_SIZE, LETTER_SIZE),
                 classifier=SVC(C=10.0, gamma="scale").fit(x, y),
                 pca=PCA(n_components=FEATURE_DIM, svd_solver="full").fit(x),
                 images=x, labels=y, class_names=letters, noun="letters")


def judge_for(info=None) -> Judge:
    """The judge of a testbed: ``info`` is a ``steersample.default.DefaultInfo`` (its metadata's
    ``testbed`` and ``class_names``), a testbed name (``"digits"``, ``"letters"``) or None
    (digits). Unknown testbeds raise ``ValueError``."""
    if info is None:
        return digits_judge()
    testbed = info if isinstance(info, str) else getattr(info, "testbed", "digits")
    if testbed == "digits":
        return digits_judge()
    if testbed == "letters":
        names = () if isinstance(info, str) else tuple(getattr(info, "class_names", ()))
        return letters_judge(names or None)
    raise ValueError(f"no judge for testbed {testbed!r}; known testbeds: digits, letters")
