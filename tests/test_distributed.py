"""Data-parallel runs: deterministic sharding, gather/merge, and a real 2-process accelerate launch."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from steersample.distributed import Distributed, launch_command, partition, units

JOB = Path(__file__).with_name("distributed_job.py")


@pytest.mark.parametrize("n", [0, 1, 2, 5, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_partition_covers_items_contiguously_and_balanced(n, world):
    blocks = [partition(n, world, r) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    if n:
        assert len(blocks[0]) >= 1  # the main process always has work
    assert [i for u in units(n, 4) for i in u] == list(range(n))
    with pytest.raises(ValueError, match="rank must lie"):
        partition(n, world, world)


def unit_fn(items):
    x = torch.tensor(list(items), dtype=torch.float64)
    return {"square": x[:, None] ** 2 * torch.ones(len(items), 3, dtype=torch.float64),
            "odd": (x % 2 == 1), "index": torch.tensor(list(items))}


def test_single_process_map_concatenates_units_in_item_order():
    world = Distributed()
    assert world.world_size == 1 and world.is_main and world.device.type == "cpu"
    seen = []
    out = world.map(unit_fn, 7, 3, on_unit_done=seen.append)
    assert seen == [range(0, 3), range(3, 6), range(6, 7)]
    assert torch.equal(out["index"], torch.arange(7)) and out["odd"].dtype == torch.bool
    assert torch.equal(out["square"][:, 0], torch.arange(7, dtype=torch.float64) ** 2)


class FakeState:
    """Rank r of W threads; gather() exchanges tensors through a shared board and a barrier."""

    def __init__(self, rank, world, board, barrier):
        self.process_index, self.num_processes, self.device = rank, world, "cpu"
        self.board, self.barrier = board, barrier

    def gather(self, tensors):
        self.board[self.process_index] = tensors
        self.barrier.wait()
        return {k: torch.cat([self.board[r][k] for r in range(self.num_processes)])
                for k in tensors}

    def wait_for_everyone(self):
        self.barrier.wait()


@pytest.mark.parametrize("n, batch, world", [(7, 3, 2), (2, 1, 3), (1, 4, 2), (10, 2, 3)])
def test_merged_results_equal_one_process(n, batch, world, monkeypatch):
    import accelerate.utils

    board, barrier = {}, threading.Barrier(world)
    states = [FakeState(r, world, board, barrier) for r in range(world)]
    monkeypatch.setattr(accelerate.utils, "gather",
                        lambda t: states[int(threading.current_thread().name)].gather(t))
    results, ran = [None] * world, [[] for _ in range(world)]

    def run(r):
        results[r] = Distributed(states[r]).map(
            lambda items: (ran[r].append(items), unit_fn(items))[1], n, batch)

    threads = [threading.Thread(target=run, args=(r,), name=str(r)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    one = Distributed().map(unit_fn, n, batch)
    for r in range(world):
        assert results[r].keys() == one.keys()
        for k in one:
            assert torch.equal(results[r][k], one[k]), (r, k)
    for r in range(world):  # each rank ran its own block (an idle rank probes unit 0 for shapes)
        assert ran[r] == (Distributed(states[r]).my_units(n, batch) or units(n, batch)[:1])
    assert [u for r in range(world) for u in Distributed(states[r]).my_units(n, batch)] == units(n, batch)


def test_bad_unit_results_are_explained():
    world = Distributed()
    with pytest.raises(TypeError, match="dict of tensors"):
        world.map(lambda items: [1, 2], 3, 2)
    with pytest.raises(ValueError, match="one row per item"):
        world.map(lambda items: {"x": torch.zeros(5)}, 3, 2)
    with pytest.raises(ValueError, match="changed shape or dtype"):
        world.map(lambda items: {"x": torch.zeros(len(items), items.start + 1)}, 3, 2)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        units(3, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_launch_writes_the_same_report_as_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    env.pop("WORLD_SIZE", None)
    args = ["--samples", "5", "--batch", "2", "--steps", "2"]
    one = subprocess.run([sys.executable, str(JOB), str(tmp_path / "one"), *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(launch_command(2, str(JOB), str(tmp_path / "two"), *args, port=_free_port()),
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-20000:]
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert r1.pop("world_size") == 1 and r2.pop("world_size") == 2
    assert r1.pop("ranks") == [0] * 5 and r2.pop("ranks") == [0, 0, 0, 0, 1]  # both processes worked
    assert r1 == r2
    assert (tmp_path / "one" / "samples.safetensors").read_bytes() == \
        (tmp_path / "two" / "samples.safetensors").read_bytes()


def tiny_model_folder(folder: Path) -> Path:
    """A model folder in the layout scripts/train_default.py writes, with a tiny random DiT."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from steersample.data import load_digits, split_indices
    from steersample.reference.reference_set import ReferenceSet
    from steersample.testing import tiny_dit_transformer

    rare, frequent = (2, 4, 8), (0, 1, 3, 5, 6, 7, 9)
    images, labels = load_digits()
    train, held = split_indices(labels, {c: (4 if c in rare else 6) for c in range(10)}, seed=0)
    tiny_dit_transformer(num_layers=1).save_pretrained(folder / "transformer", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    ReferenceSet(images[train], labels[train]).save(folder / "reference.safetensors")
    (folder / "metadata.json").write_text(json.dumps({
        "rare_classes": list(rare), "frequent_classes": list(frequent), "null_class": 10,
        "split": {"train_indices": train.tolist(), "held_out_indices": held.tolist()},
        "training_config": {}, "git_commit": "test", "command": "tiny"}))
    return folder


def test_two_process_audit_writes_the_same_report_as_one_process(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    env.pop("WORLD_SIZE", None)
    args = ["audit", "--model", str(model), "--grid", "quick", "--rare-samples", "3",
            "--frequent-samples", "2", "--steps", "2", "--timing-repeats", "0", "--batch-size", "5",
            "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "steersample.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(launch_command(2, "-m", "steersample.cli", *args, "--out", str(tmp_path / "two"),
                                        port=_free_port()),
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-20000:]
    assert "(2 processes)" in two.stdout
    r1, r2 = (json.loads((tmp_path / d / "audit.json").read_text()) for d in ("one", "two"))
    r1.pop("seconds_total"), r2.pop("seconds_total")   # wall clock: the one figure allowed to differ
    # what the seconds count, and how many processes ran: said, and otherwise the same report
    assert r1["settings"].pop("processes") == 1 and r2["settings"].pop("processes") == 2
    assert "2 processes" in r2.pop("seconds_counts") and "processes" not in r1.pop("seconds_counts")
    assert r1 == r2
    for name in ("sheet.png", "pareto.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_two_process_compare_writes_the_same_report_and_sheet_as_one_process(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    env.pop("WORLD_SIZE", None)
    args = ["compare", "--model", str(model), "--classes", "2", "0", "--samples", "3", "--steps", "2",
            "--batch-size", "2", "--sheet-samples", "2", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "steersample.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(launch_command(2, "-m", "steersample.cli", *args, "--out", str(tmp_path / "two"),
                                        port=_free_port()),
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-20000:]
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert r1.pop("processes") == 1 and r2.pop("processes") == 2
    assert "main process" in r2.pop("seconds_counts") and "main process" not in r1.pop("seconds_counts")
    assert "main process" in (tmp_path / "two" / "report.md").read_text()   # says what seconds count
    for report in (r1, r2):   # wall clock: the only figures allowed to differ
        report.pop("seconds_total")
        for run in report["results"].values():
            run.pop("seconds")
    assert r1 == r2
    assert (tmp_path / "one" / "sheet.png").read_bytes() == (tmp_path / "two" / "sheet.png").read_bytes()


def test_close_tears_down_a_launched_process_group_and_is_a_no_op_alone():
    class FakeState:
        process_index, num_processes, device = 1, 2, "cpu"
        destroyed = 0

        def destroy_process_group(self):
            FakeState.destroyed += 1

    world = Distributed(state=FakeState())
    assert (world.rank, world.world_size) == (1, 2)
    world.close()
    assert FakeState.destroyed == 1
    alone = Distributed()
    assert alone.state is None
    alone.close()   # nothing to tear down, nothing raised


def test_leave_ends_only_a_launched_helper(monkeypatch):
    import steersample.distributed as dist

    exits = []
    monkeypatch.setattr(dist.os, "_exit", exits.append)

    class State:
        num_processes, device = 2, "cpu"

        def __init__(self, rank):
            self.process_index = rank

    Distributed(state=State(0)).leave()    # the main process carries on
    Distributed().leave()                  # so does a single process
    assert exits == []
    Distributed(state=State(1)).leave()
    assert exits == [0]
