"""Quality per model evaluation: which σ grid reaches a given FD with the fewest model calls.

For each testbed (the embedded ``digits`` default and, when its assets exist, ``letters``; on
request ``prompt``, the SD3 testbed, whose classes are sampled by their prompts and judged in
VAE-latent space), the frequent classes are sampled with CFG 2 on several σ grids at 2-30 steps, with CFG everywhere
and with CFG only in the window σ ∈ (0.4, 0.9] (Kynkäänniemi et al., arXiv 2404.07724), and
judged against the held-out real images of each class:

- **FD**: Fréchet distance per class in a fixed 16-d PCA feature space, averaged over the
  frequent classes. digits: ``steersample.evaluation.judge.frechet_distance`` (PCA of all
  1,797 digits); letters (and prompt): the same formula in the 16-d PCA of all its training
  plus held-out images (prompt: latents). Equal sample counts for every arm (FD is biased by the count).
- **precision / recall**, k = 3 (Kynkäänniemi et al. 2019), per class against the held-out
  images (pixel space), averaged; ``ss.metrics.precision_recall``.
- **accuracy**: the judge's class accuracy (digits: ``judge.class_accuracy``; letters and
  prompt: an ``SVC(C=10, gamma="scale")`` fitted on all its training plus held-out images).
- **NFE**: model evaluations per sample, counted from the grid: one conditional pass per
  evaluated σ plus one unconditional pass where the guidance needs it
  (``GuidanceSchedule.count_evaluations``): 2N with CFG everywhere, fewer with the window.

Grids: diffusers' stock grid of the shipped scheduler config (shift 1), shift 3 (SD3's),
``PhaseAwareFlowMatchScheduler(phase_boundary=σ*, navigation_fraction=0.6)``, the uniform grid
that ends at 0 (``σ_i = 1 − i/N``), ``PhaseAwareFlowMatchScheduler.from_profile(config,
profile)`` (profile = ``PhaseProfile.estimate(ref)``, seed 0; its default density
``∝ (1 − λ) + λ·√a``, ``a`` the oracle's trajectory acceleration, ``λ_N = 0.65 − 1/N`` at N
steps), the same with the earlier constant λ = 0.5 ("from_profile λ 0.5") and the earlier
``from_profile(config, profile, density="top1")`` (rate of change of the top-1 curve, λ = 0.2,
"from_profile top1"). Every arm runs through the real
pipeline with the scheduler swapped in. Seeds are shared across grids (sample i of class c in
seed group g always starts from the same noise); mean ± sd over the seed groups.

Prints the table, then the **savings** table: for each stock step count, the NFE each grid needs
to reach the stock grid's mean FD (linear interpolation of mean FD in NFE between measured step
counts) and the share of evaluations saved. Writes ``docs/quality-per-nfe.png`` (FD against NFE,
one line per grid) and, with ``--json``, the raw numbers.

``--fit`` instead fits the share of ``acceleration_sigmas`` on digits with seeds disjoint from
the benchmark's: constant λ ∈ {0.4, 0.5} and ``λ_N = λ∞ − 1/N`` for λ∞ ∈ {0.55, …, 0.75}, each
scored by its smallest saving against the stock grid over 4-10 steps (how
``DEFAULT_ACCELERATION_MIXING`` = 0.65 was chosen). The power p = 1/2 is the theory's: an
earlier sweep (p = 0.5, 0.75, 1 at λ = 0.3-0.7, FD relative to the uniform grid) found them
tied within 0.0002. The earlier ``DEFAULT_PROFILE_MIXING`` = 0.2 of the top-1 grid was chosen
by that earlier sweep's criterion.

Run: ``python benchmarks/quality_per_nfe.py [--quick] [--testbed digits letters] [--groups 3]``
(default: both testbeds if letters exists, 3 seed groups of 48 samples per class: about
4 minutes per testbed on one core).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from steersample.default import DEFAULT_MODELS, held_out, load_default, load_default_info
from steersample.oracle.phases import PhaseProfile
from steersample.sampling.guidance import GuidanceSchedule
from steersample.sampling.scheduler import PhaseAwareFlowMatchScheduler
from steersample.sampling.schedules import (
    DEFAULT_ACCELERATION_MIXING,
    DEFAULT_PROFILE_MIXING,
    acceleration_mixing,
    acceleration_sigmas,
    uniform_sigmas,
)

__all__ = ["main"]

STEPS = (2, 3, 4, 5, 6, 7, 8, 10, 15, 20, 30)
QUICK_STEPS = (2, 3, 4, 6, 8, 10, 30)
FIT_STEPS = (3, 4, 5, 6, 7, 8, 10)
FIT_MIXINGS = (0.4, 0.5)
FIT_LIMITS = (0.55, 0.6, 0.65, 0.7, 0.75)
SAVING_STEPS = (4, 5, 6, 7, 8, 10)
GUIDANCE = 2.0
WINDOW = (0.4, 0.9)
BENCH_SEED, FIT_SEED = 0, 1_000_000
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- judging
def _fd_features(fa: np.ndarray, fb: np.ndarray) -> float:
    """FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as judge.frechet_distance."""
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    wa, va = np.linalg.eigh(ca)
    root = (va * np.sqrt(np.clip(wa, 0, None))) @ va.T
    m = root @ cb @ root
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross, 0.0))


def _precision_recall(samples: torch.Tensor, real: torch.Tensor, k: int = 3) -> tuple[float, float]:
    try:
        from steersample.evaluation.metrics import precision_recall
    except ImportError:  # before the metric landed: the same definition, locally
        precision_recall = None
    if precision_recall is not None:
        pr = precision_recall(samples, real, k=k)
        return pr.precision, pr.recall
    x, h = samples.flatten(1).double(), real.flatten(1).double()
    r_h = torch.cdist(h, h).topk(k + 1, largest=False).values[:, k]
    r_x = torch.cdist(x, x).topk(k + 1, largest=False).values[:, k]
    d = torch.cdist(x, h)
    return float((d <= r_h[None]).any(1).double().mean()), float((d.T <= r_x[None]).any(1).double().mean())


@dataclass
class Testbed:
    name: str
    pipe: object
    ref: object
    config: dict  # the shipped scheduler config (the pipeline's scheduler is swapped per arm)
    classes: tuple[int, ...]
    held: dict[int, torch.Tensor]
    fd: Callable[[torch.Tensor, torch.Tensor], float]
    accuracy: Callable[[torch.Tensor, torch.Tensor], float]
    profile: PhaseProfile
    call: dict = field(default_factory=dict)   # prompt testbed: extra call arguments

    def sample(self, labels: list[int], **kwargs) -> torch.Tensor:
        """Latents of one call: class labels, or (prompt testbed) the class names as prompts."""
        if self.name != "prompt":
            return self.pipe(class_labels=labels, **kwargs).images
        names = load_default_info(self.name).class_names
        return self.pipe(prompt=[names[c] for c in labels], **self.call, **kwargs).images


def load_testbed(name: str) -> Testbed:
    pipe, ref = load_default(name)
    info = load_default_info(name)
    hx, hy = held_out(name)
    classes = tuple(info.frequent_classes)
    held = {c: hx[hy == c] for c in classes}
    if name == "digits":
        from steersample.evaluation import judge

        fd, accuracy = judge.frechet_distance, judge.class_accuracy
    else:
        from sklearn.decomposition import PCA
        from sklearn.svm import SVC

        everything = torch.cat([ref.latents, hx]).flatten(1).double().numpy()
        labels = torch.cat([ref.labels, hy]).numpy()
        pca = PCA(n_components=16, svd_solver="full").fit(everything)
        svc = SVC(C=10.0, gamma="scale").fit(everything, labels)

        def fd(a, b):
            return _fd_features(pca.transform(a.flatten(1).double().numpy()),
                                pca.transform(b.flatten(1).double().numpy()))

        def accuracy(x, y):
            return float((svc.predict(x.flatten(1).double().numpy()) == np.asarray(y)).mean())

    profile = PhaseProfile.estimate(ref, torch.Generator().manual_seed(0))
    call = {}
    if name == "prompt":   # the testbed's call defaults (no T5 tokens, 16x16 images)
        call = json.loads((Path(info.path) / "metadata.json").read_text()).get("call", {})
    return Testbed(name, pipe, ref, dict(pipe.scheduler.config), classes, held, fd, accuracy, profile,
                   call)


# ----------------------------------------------------------------------------- grids
def grids(bed: Testbed) -> dict[str, Callable[[int], tuple]]:
    """name -> (n -> (scheduler, sigmas or None)): what the pipeline is called with."""
    cfg = bed.config
    stock = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    shift3 = FlowMatchEulerDiscreteScheduler.from_config(cfg, shift=3.0)
    phase = PhaseAwareFlowMatchScheduler.from_config(cfg, phase_boundary=bed.profile, navigation_fraction=0.6)
    top1 = PhaseAwareFlowMatchScheduler.from_profile(cfg, bed.profile, density="top1")
    prof = PhaseAwareFlowMatchScheduler.from_profile(cfg, bed.profile)
    half = PhaseAwareFlowMatchScheduler.from_profile(cfg, bed.profile, mixing=0.5)
    return {
        "stock (shift 1)": lambda n: (stock, None),
        "shift 3": lambda n: (shift3, None),
        "phase-aware f=0.6": lambda n: (phase, None),
        "uniform to 0": lambda n: (stock, uniform_sigmas(n).tolist()),
        "from_profile top1": lambda n: (top1, None),
        "from_profile λ 0.5": lambda n: (half, None),
        "from_profile": lambda n: (prof, None),
    }


def run_arm(bed: Testbed, scheduler, sigmas, n: int, guidance: GuidanceSchedule,
            group: int, per_class: int, base_seed: int) -> dict:
    """One (grid, steps, guidance, seed group): samples of every frequent class, judged."""
    labels = [c for c in bed.classes for _ in range(per_class)]
    gens = [torch.Generator().manual_seed(base_seed + 100_000 * group + 1_000 * c + i)
            for c in bed.classes for i in range(per_class)]
    bed.pipe.scheduler = scheduler
    x = bed.sample(labels, num_inference_steps=n, sigmas=sigmas, guidance=guidance,
                   generator=gens, output_type="latent", return_telemetry=False)
    x = x.float() if bed.name == "prompt" else x.clamp(-1, 1).float()   # pixels: as decoded
    probe = copy.deepcopy(scheduler)  # the grid the pipeline's per-run copy sampled on
    probe.set_timesteps(n) if sigmas is None else probe.set_timesteps(sigmas=sigmas)
    evaluated = probe.sigmas
    if len(evaluated) - 1 != n:
        raise RuntimeError(f"{n} steps asked, the grid evaluates {len(evaluated) - 1}")
    y = torch.tensor(labels)
    fds, precs, recs = [], [], []
    for c in bed.classes:
        xc = x[y == c]
        fds.append(bed.fd(xc, bed.held[c]))
        p, r = _precision_recall(xc, bed.held[c], k=3)
        precs.append(p)
        recs.append(r)
    return {"nfe": guidance.count_evaluations(evaluated[:-1]), "fd": float(np.mean(fds)),
            "precision": float(np.mean(precs)), "recall": float(np.mean(recs)),
            "accuracy": bed.accuracy(x, y)}


def guidances() -> dict[str, GuidanceSchedule]:
    return {"CFG everywhere": GuidanceSchedule.constant(GUIDANCE),
            f"window {WINDOW}": GuidanceSchedule.interval(GUIDANCE, *WINDOW)}


# ----------------------------------------------------------------------------- tables
def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def nfe_to_reach(points: list[tuple[float, float]], target: float) -> float:
    """Smallest NFE at which the piecewise-linear mean-FD curve (sorted by NFE) reaches target."""
    points = sorted(points)
    if points[0][1] <= target:
        return points[0][0]
    for (n0, f0), (n1, f1) in zip(points, points[1:]):
        if f1 <= target:
            return n0 + (f0 - target) * (n1 - n0) / (f0 - f1)
    return math.inf


def print_tables(bed_name: str, results: dict, steps: tuple[int, ...]) -> str:
    lines = [f"\n== {bed_name}: frequent classes, CFG {GUIDANCE}, mean ± sd over seed groups =="]
    head = (f"{'grid':<18} {'guidance':<18} {'steps':>5} {'NFE':>6} {'FD':>13} {'precision':>13} "
            f"{'recall':>13} {'accuracy':>9}")
    lines.append(head)
    for (grid, guide, n), runs in results.items():
        fd, fd_sd = _stats([r["fd"] for r in runs])
        p, p_sd = _stats([r["precision"] for r in runs])
        rc, rc_sd = _stats([r["recall"] for r in runs])
        acc, _ = _stats([r["accuracy"] for r in runs])
        nfe, _ = _stats([r["nfe"] for r in runs])
        lines.append(f"{grid:<18} {guide:<18} {n:>5} {nfe:>6.0f} {fd:>6.2f} ± {fd_sd:<4.2f} "
                     f"{p:>6.3f} ± {p_sd:<4.3f} {rc:>6.3f} ± {rc_sd:<4.3f} {acc:>9.3f}")
    for guide in guidances():
        curves = {}
        for (grid, g, n), runs in results.items():
            if g == guide:
                curves.setdefault(grid, []).append((_stats([r["nfe"] for r in runs])[0],
                                                    _stats([r["fd"] for r in runs])[0]))
        stock = dict((n, v) for n, v in sorted(curves["stock (shift 1)"]))
        lines.append(f"\n{bed_name}, {guide}: NFE needed to reach the stock grid's mean FD "
                     "(saving vs stock)")
        names = [g for g in curves if g != "stock (shift 1)"]
        lines.append(f"{'stock steps':>11} {'stock NFE':>9} {'stock FD':>8} "
                     + " ".join(f"{g:>22}" for g in names))
        for nfe_s, fd_s in sorted(curves["stock (shift 1)"]):
            cells = []
            for g in names:
                need = nfe_to_reach(curves[g], fd_s)
                cells.append(f"{need:>9.1f} ({1 - need / nfe_s:>+7.1%})   " if math.isfinite(need)
                             else f"{'not reached':>22}")
            steps_s = [n for (gr, g, n), runs in results.items()
                       if gr == "stock (shift 1)" and g == guide
                       and abs(_stats([r['nfe'] for r in runs])[0] - nfe_s) < 1e-9][0]
            lines.append(f"{steps_s:>11} {nfe_s:>9.0f} {fd_s:>8.2f} " + " ".join(f"{c:>22}" for c in cells))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(all_results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    beds = list(all_results)
    fig, axes = plt.subplots(len(beds), 2, figsize=(9, 3.2 * len(beds)), squeeze=False, sharey="row")
    for r, bed in enumerate(beds):
        for col, guide in enumerate(guidances()):
            ax = axes[r][col]
            curves: dict[str, list] = {}
            for (grid, g, n), runs in all_results[bed].items():
                if g == guide:
                    fd, sd = _stats([x["fd"] for x in runs])
                    curves.setdefault(grid, []).append((_stats([x["nfe"] for x in runs])[0], fd, sd))
            for grid, pts in curves.items():
                pts.sort()
                nfe, fd, sd = map(np.asarray, zip(*pts))
                ax.errorbar(nfe, fd, yerr=sd, label=grid, marker="o", ms=3, lw=1.2, capsize=2)
            ax.set_xscale("log")
            ax.set_xticks([2, 4, 6, 10, 20, 40, 60])
            ax.xaxis.set_major_formatter(ScalarFormatter())   # plain numbers, not 4x10^0
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("model evaluations per sample (NFE)")
            ax.set_title(f"{bed}: {guide}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        axes[r][0].set_ylabel("FD to held-out (frequent classes)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- fit
def fit(groups: int, per_class: int) -> float:
    """Fit the acceleration grid's share on digits (fit seeds, disjoint from the benchmark's).

    Sweeps a constant share λ (the earlier default, 0.5) and the step-count-dependent share
    ``λ_N = λ∞ − 1/N`` (:func:`~steersample.sampling.schedules.acceleration_mixing`) over
    :data:`FIT_LIMITS`, at the theory's power p = 1/2, and scores each by what issue #16 asks
    for: the share of model evaluations saved against the stock grid at 4-10 stock steps (NFE
    needed to reach the stock grid's mean FD, as in the benchmark's savings table). Returns the
    λ∞ with the largest smallest saving (ties: the larger mean saving).
    """
    bed = load_testbed("digits")
    stock = FlowMatchEulerDiscreteScheduler.from_config(bed.config)
    guide = GuidanceSchedule.constant(GUIDANCE)
    prof = bed.profile

    def mean_fd(sigmas_of, steps=FIT_STEPS):
        return {n: float(np.mean([run_arm(bed, stock, sigmas_of(n), n, guide, g, per_class, FIT_SEED)["fd"]
                                  for g in range(groups)])) for n in steps}

    stock_fd = mean_fd(lambda n: None, SAVING_STEPS)

    def savings(fds):
        curve = sorted((2 * n, v) for n, v in fds.items())
        return [1 - nfe_to_reach(curve, stock_fd[n]) / (2 * n) for n in SAVING_STEPS]

    def grid(n, lam):
        return acceleration_sigmas(n, prof.sigmas, prof.acceleration, lam).tolist()

    arms = {f"lambda = {lam}": (lambda n, lam=lam: grid(n, lam)) for lam in FIT_MIXINGS}
    arms.update({f"lambda = {lim} - 1/N": (lambda n, lim=lim: grid(n, acceleration_mixing(n, lim)))
                 for lim in FIT_LIMITS})
    print(f"fit on digits (seeds from {FIT_SEED}, {groups} groups x {per_class} per class): saving of "
          "model evaluations against the stock grid")
    print(f"{'share':<20} " + " ".join(f"{n:>6}" for n in SAVING_STEPS) + f" {'smallest':>9} {'mean':>6}")
    scores = {}
    for name, sigmas_of in arms.items():
        row = savings(mean_fd(sigmas_of))
        scores[name] = (min(row), float(np.mean(row)))
        print(f"{name:<20} " + " ".join(f"{x:>+6.1%}" for x in row)
              + f" {scores[name][0]:>+9.1%} {scores[name][1]:>+6.1%}", flush=True)
    best = max((name for name in scores if name.endswith("1/N")), key=scores.get)
    print(f"best: {best} (smallest saving {scores[best][0]:+.1%}); best constant: "
          f"{max((n for n in scores if not n.endswith('1/N')), key=scores.get)}")
    return float(best.split("=")[1].split("-")[0])


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", nargs="+", default=None, choices=sorted(DEFAULT_MODELS),
                        help="default: digits, and letters when its assets exist")
    parser.add_argument("--groups", type=int, default=None, help="seed groups (default 3; --quick 2)")
    parser.add_argument("--per-class", type=int, default=None, help="samples per class and group (48; --quick 24)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, groups and samples")
    parser.add_argument("--fit", action="store_true",
                        help="fit the acceleration grid's share on digits (separate seeds) instead")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default=str(ROOT / "docs" / "quality-per-nfe.png"))
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    parser.add_argument("--replot", nargs="+", default=None, metavar="JSON",
                        help="no sampling: print the tables and draw the plot from --json files")
    args = parser.parse_args(argv)
    if args.replot:
        loaded = {}
        for path in args.replot:
            for bed, rows in json.loads(Path(path).read_text()).items():
                loaded[bed] = {(r["grid"], r["guidance"], r["steps"]): r["runs"] for r in rows}
        for bed, res in loaded.items():
            print_tables(bed, res, tuple(sorted({k[2] for k in res})))
        plot(loaded, Path(args.plot))
        print(f"plot: {args.plot}")
        return 0
    torch.set_num_threads(args.threads)
    groups = args.groups or (2 if args.quick else 3)
    per_class = args.per_class or (24 if args.quick else 48)
    t0 = time.time()
    if args.fit:
        fit(groups, per_class)
        print(f"{time.time() - t0:.0f} s")
        return 0
    beds = args.testbed
    if beds is None:
        beds = ["digits"] + (["letters"] if (DEFAULT_MODELS["letters"] / "metadata.json").is_file() else [])
    steps = QUICK_STEPS if args.quick else STEPS
    all_results, texts = {}, []
    for name in beds:
        bed = load_testbed(name)
        print(f"{name}: sigma* = {bed.profile.boundary_sigma:.3f}, from_profile mixing = "
              f"{DEFAULT_ACCELERATION_MIXING} - 1/N (top1: {DEFAULT_PROFILE_MIXING}), "
              f"{groups} groups x {per_class} samples x {len(bed.classes)} classes", flush=True)
        results: dict[tuple[str, str, int], list[dict]] = {}
        for guide_name, guide in guidances().items():
            for grid_name, make in grids(bed).items():
                for n in steps:
                    sched, sig = make(n)
                    results[grid_name, guide_name, n] = [
                        run_arm(bed, sched, sig, n, guide, g, per_class, BENCH_SEED) for g in range(groups)]
        all_results[name] = results
        texts.append(print_tables(name, results, steps))
        print(f"[{time.time() - t0:.0f} s]", flush=True)
    plot(all_results, Path(args.plot))
    print(f"plot: {args.plot}; {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {bed: [{"grid": k[0], "guidance": k[1], "steps": k[2], "runs": v} for k, v in res.items()]
             for bed, res in all_results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
