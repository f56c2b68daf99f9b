"""Data-parallel runs under ``accelerate launch``: deterministic sharding, gather, merge.

A run is a list of ``n`` items (samples: a seed and a label or prompt each). It is cut into
fixed *units* of ``batch_size`` consecutive items, the same units whatever the number of
processes; process r of W runs a contiguous block of units (``numpy.array_split`` order, so
process 0 always has work). Each unit is computed exactly as a one-process run computes it (same
items, same batch, same seeds), the per-item results are gathered as tensors (no pickling) and
concatenated in item order. So the merged results are identical to a one-process run, provided
each process uses the same kernels (same device type, same threads per process: ``accelerate
launch`` sets ``OMP_NUM_THREADS=1`` on CPU; run the one-process reference with the same setting).

    world = Distributed()                          # accelerate.PartialState when launched
    out = world.map(generate_unit, n=len(seeds), batch_size=16)   # {name: (n, ...)} on every process
    if world.is_main:
        write_report(out)

``generate_unit(items: range) -> dict[str, Tensor]`` returns tensors with ``len(items)`` rows.
Launch (CPU or GPUs; no accelerate config file needed):

    accelerate launch --multi_gpu --num_processes 2 -m steersample.cli compare ...
    # CPU-only machines use the same flag: torchrun starts the processes, gloo connects them

Several nodes: the same command on each node with ``--num_machines M --machine_rank i
--main_process_ip HOST --main_process_port PORT`` (see ``docs/scaling.md``).
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import numpy as np
import torch

__all__ = ["Distributed", "partition", "units", "seeded_generators", "launch_command"]

_WORLD_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def units(n: int, batch_size: int) -> list[range]:
    """The fixed units: ``[0, b), [b, 2b), ...`` covering ``n`` items (the last may be shorter)."""
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 items and batch_size >= 1, got n={n}, batch_size={batch_size}")
    return [range(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]


def partition(n: int, world_size: int, rank: int) -> range:
    """Rank ``rank``'s contiguous block of ``n`` things: the first ``n % W`` ranks get one more."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class Distributed:
    """This process's place in the run: rank, world size, device, and :meth:`map`.

    Without a launcher (no ``WORLD_SIZE`` > 1 in the environment) it is a plain single process
    and accelerate is not imported. Under ``accelerate launch`` it wraps ``accelerate.PartialState``
    (on machines without CUDA it asks for the CPU/gloo backend).
    """

    def __init__(self, state=None) -> None:
        launched = any(int(os.environ.get(name, "1") or 1) > 1 for name in _WORLD_ENV)
        if state is None and launched:
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available())
        self.state = state
        self.rank = 0 if state is None else int(state.process_index)
        self.world_size = 1 if state is None else int(state.num_processes)
        self.device = torch.device("cpu") if state is None else torch.device(state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Distributed(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    def wait(self) -> None:
        """Barrier: every process reaches this line before any continues."""
        if self.state is not None and self.world_size > 1:
            self.state.wait_for_everyone()

    def close(self) -> None:
        """Tear down the process group (every process, once its last collective is done).

        Left to interpreter exit, gloo's threads can outlive it and abort a process ("terminate
        called without an active exception", SIGABRT), failing the whole launch. Local only:
        a process that closes does not wait for the others. A no-op in a single process.
        """
        if self.state is not None and self.world_size > 1:
            self.state.destroy_process_group()

    def leave(self) -> None:
        """End a helper process (rank > 0 of a launch) after its last collective, status 0.

        Flushes its output and calls ``os._exit(0)``: the interpreter's teardown is skipped,
        where gloo's threads can outlive the process group and abort a helper ("terminate
        called without an active exception", SIGABRT), which fails the whole launch although
        every result was already merged. A no-op in the main process or a single process.
        """
        if self.state is None or self.world_size <= 1 or self.is_main:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def my_units(self, n: int, batch_size: int) -> list[range]:
        """The units this process runs."""
        all_units = units(n, batch_size)
        block = partition(len(all_units), self.world_size, self.rank)
        return all_units[block.start:block.stop]

    def map(self, fn: Callable[[range], dict[str, torch.Tensor]], n: int, batch_size: int,
            on_unit_done: Callable[[range], None] | None = None) -> dict[str, torch.Tensor]:
        """Run ``fn`` on this process's units and return every process's results, merged.

        Args:
            fn: ``fn(items) -> {name: tensor with len(items) rows}``; the same names, dtypes and
                trailing shapes for every unit.
            n: number of items; batch_size: items per unit (fixes the computation, so keep it
                the same between runs that must agree).
            on_unit_done: called after each local unit (progress bars).

        Returns ``{name: (n, ...)}`` on the CPU, identical on every process.
        """
        mine = self.my_units(n, batch_size)
        parts: list[dict[str, torch.Tensor]] = []
        for items in mine:
            out = fn(items)
            _check_unit(out, items, parts[0] if parts else None)
            parts.append({k: v.detach().cpu() for k, v in out.items()})
            if on_unit_done is not None:
                on_unit_done(items)
        if not parts:  # fewer units than processes: learn the shapes from unit 0, contribute no rows
            probe = fn(units(n, batch_size)[0])
            parts = [{k: v.detach().cpu()[:0] for k, v in probe.items()}]
        local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return self._gather(local, n, batch_size)

    def _gather(self, local: dict[str, torch.Tensor], n: int, batch_size: int) -> dict[str, torch.Tensor]:
        if self.world_size == 1:
            return local
        from accelerate.utils import gather

        n_units = len(units(n, batch_size))
        counts = []
        for r in range(self.world_size):
            block = partition(n_units, self.world_size, r)
            counts.append(sum(len(u) for u in units(n, batch_size)[block.start:block.stop]))
        width = max(counts)
        padded = {}
        for name, t in local.items():
            pad = torch.zeros((width - t.shape[0], *t.shape[1:]), dtype=t.dtype)
            wire = torch.cat([t, pad]).to(self.device)
            padded[name] = wire.to(torch.uint8) if wire.dtype == torch.bool else wire
        full = gather(padded)
        merged = {}
        for name, t in full.items():
            t = t.cpu()
            t = t.to(torch.bool) if local[name].dtype == torch.bool else t
            merged[name] = torch.cat([t[r * width:r * width + counts[r]] for r in range(self.world_size)])
        return merged


def _check_unit(out: object, items: range, first: dict[str, torch.Tensor] | None) -> None:
    if not isinstance(out, dict) or not all(isinstance(v, torch.Tensor) for v in out.values()):
        raise TypeError(f"the unit function must return a dict of tensors, got {type(out).__name__}")
    for name, t in out.items():
        if t.dim() == 0 or t.shape[0] != len(items):
            raise ValueError(f"result {name!r} has shape {tuple(t.shape)} for a unit of {len(items)} "
                             f"items; return one row per item")
        if first is not None and (name not in first or first[name].shape[1:] != t.shape[1:]
                                  or first[name].dtype != t.dtype):
            raise ValueError(f"result {name!r} changed shape or dtype between units; every unit "
                             f"must return the same names, dtypes and trailing shapes")
    if first is not None and set(first) != set(out):
        raise ValueError(f"units returned different result names: {sorted(first)} vs {sorted(out)}")


def seeded_generators(seeds: list[int] | np.ndarray, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per item, seeded with its own seed (sample k = seed k, any batch)."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def launch_command(num_processes: int, *args: str, port: int | None = None) -> list[str]:
    """``python -m accelerate.commands.launch`` argv for ``num_processes`` local processes
    running ``args`` (a script path, or ``-m module ...``); every option is explicit, so no
    accelerate config file is read or needed."""
    import sys

    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if num_processes > 1:
        cmd.append("--multi_gpu")  # torchrun-style launch; on CPU-only machines it runs gloo on CPU
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    return cmd + list(args)
