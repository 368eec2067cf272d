"""Device placement decisions on made-up GPU inventories (no GPU needed), and what the release
manager and the vLLM command make of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ground.platform import Platform
from serving.engine.vllm_server import VLLMArgs, build_command
from serving.releases.manager import ReleaseManager
from serving.releases.placement import (
    Gpu,
    Placement,
    PlacementConfig,
    PlacementError,
    apply_placement,
    parse_inventory,
    place_release,
    place_training,
)
from serving.releases.store import ReleaseStore

H200 = 143771
ONE = (Gpu(0, "NVIDIA H200", H200),)
TWO = (Gpu(0, "NVIDIA H200", H200), Gpu(1, "NVIDIA H200", H200))
EIGHT = tuple(Gpu(i, "NVIDIA H200", H200) for i in range(8))
CFG = PlacementConfig()  # max_releases 4, training_reserve 0.2, headroom 0.05


def _fill(gpus, n: int, args: VLLMArgs | None = None, cfg: PlacementConfig = CFG) -> dict[str, Placement]:
    held: dict[str, Placement] = {}
    for i in range(n):
        held[f"r{i}"] = place_release(args or VLLMArgs(), gpus, held, cfg)
    return held


def test_cpu_gets_no_devices_and_arguments_stay_as_they_were() -> None:
    p = place_release(VLLMArgs(), (), {}, CFG)
    assert p.on_cpu and p.env() == {}
    args = VLLMArgs(kv_cache_gib=2)
    assert apply_placement(args, p) == args
    assert place_training((), {}, [], CFG).on_cpu


def test_one_gpu_is_shared_by_max_releases_and_leaves_room_for_training() -> None:
    held = _fill(ONE, 4)
    share = 0.187  # (1 - 0.2 - 0.05) / 4, rounded down
    assert all(p.devices == (0,) and p.share == share and not p.exclusive for p in held.values())
    with pytest.raises(PlacementError, match=r"no room .*GPU 0: 0\.75 given \(r0, r1, r2, r3\)"):
        place_release(VLLMArgs(), ONE, held, CFG)
    # Training beside the live release only: what the release leaves, minus the headroom.
    train = place_training(ONE, {"live": held["r0"]}, [], CFG)
    assert train.devices == (0,) and train.share == pytest.approx(1 - 0.05 - share)
    # Beside all four it still has the reserve.
    assert place_training(ONE, held, [], CFG).share == pytest.approx(0.202)


def test_two_gpus_spread_releases_and_training_takes_a_free_gpu() -> None:
    held = _fill(TWO, 4)
    assert [p.devices for p in held.values()] == [(0,), (1,), (0,), (1,)]
    assert {p.share for p in held.values()} == {0.375}
    live_only = {"live": held["r0"]}
    train = place_training(TWO, live_only, [], CFG)
    assert train.devices == (1,) and train.share is None and train.exclusive
    # Two processes wanted: one GPU whole is not enough, so both are shared at the smaller share.
    both = place_training(TWO, live_only, [], CFG, want=2)
    assert both.devices == (0, 1) and both.share == pytest.approx(1 - 0.05 - 0.375)


def test_enough_gpus_means_whole_gpus() -> None:
    held = _fill(EIGHT, 4)
    assert [p.devices for p in held.values()] == [(0,), (1,), (2,), (3,)]
    assert all(p.exclusive and p.share == CFG.whole_gpu_share for p in held.values())
    train = place_training(EIGHT, held, [], CFG)
    assert train.devices == (4, 5, 6, 7) and train.share is None


def test_tensor_and_data_parallel_need_that_many_gpus() -> None:
    with pytest.raises(PlacementError, match="needs 2 GPUs .*tensor_parallel_size 2"):
        place_release(VLLMArgs(tensor_parallel_size=2), ONE, {}, CFG)
    tp2 = place_release(VLLMArgs(tensor_parallel_size=2), TWO, {}, CFG)
    dp2 = place_release(VLLMArgs(data_parallel_size=2), TWO, {"tp2": tp2}, CFG)
    assert tp2.devices == dp2.devices == (0, 1)
    assert tp2.share == dp2.share == 0.187  # 4 releases x 2 GPUs over 2 GPUs
    whole = place_release(VLLMArgs(tensor_parallel_size=2), EIGHT, {}, PlacementConfig(max_releases=2))
    assert whole.devices == (0, 1) and whole.exclusive


def test_a_set_memory_share_is_honoured_or_refused() -> None:
    p = place_release(VLLMArgs(gpu_memory_utilization=0.5), ONE, {}, CFG)
    assert p.share == 0.5
    with pytest.raises(PlacementError, match="0.500 memory share"):
        place_release(VLLMArgs(gpu_memory_utilization=0.5), ONE, {"a": p}, CFG)
    # The shipped default used to be 0.85 for every release: that leaves training nothing.
    with pytest.raises(PlacementError, match="training_reserve 0.2 and headroom 0.05"):
        place_release(VLLMArgs(gpu_memory_utilization=0.85), ONE, {}, CFG)
    alone = PlacementConfig(training_reserve=0)
    first = place_release(VLLMArgs(gpu_memory_utilization=0.85), ONE, {}, alone)
    with pytest.raises(PlacementError):
        place_release(VLLMArgs(gpu_memory_utilization=0.85), ONE, {"a": first}, alone)


def test_training_stops_idle_candidates_only_when_that_frees_whole_gpus() -> None:
    held = {"live": Placement((0,), 0.375), "cand": Placement((1,), 0.375)}
    train = place_training(TWO, held, ["cand"], CFG)
    assert train.devices == (1,) and train.stop == ("cand",) and train.share is None
    assert place_training(TWO, held, ["cand"], PlacementConfig(stop_idle_for_training=False)).stop == ()
    # A candidate sharing the live release's GPU frees nothing whole: it keeps running.
    held = {"live": Placement((0,), 0.375), "cand": Placement((0,), 0.375)}
    shared = place_training(ONE, held, ["cand"], CFG)
    assert shared.stop == () and shared.share == pytest.approx(1 - 0.05 - 0.75)


def test_training_without_memory_is_a_clear_error() -> None:
    held = {"live": Placement((0,), 0.9, exclusive=True)}
    with pytest.raises(PlacementError, match="no GPU memory for training.*GPU 0: 1.00 given \\(live\\)"):
        place_training(ONE, held, [], CFG)
    with pytest.raises(PlacementError, match="wants 3 GPUs"):
        place_training(TWO, {}, [], CFG, want=3)


def test_inventory_honours_cuda_visible_devices_and_the_allow_list() -> None:
    smi = "0, GPU-aaa, NVIDIA H200, 143771\n1, GPU-bbb, NVIDIA H200, 143771\n"
    assert [g.index for g in parse_inventory(smi, None, None)] == [0, 1]
    assert [g.index for g in parse_inventory(smi, "1", None)] == [1]
    assert [g.index for g in parse_inventory(smi, "GPU-aaa", None)] == [0]
    assert parse_inventory(smi, "", None) == ()
    assert [g.index for g in parse_inventory(smi, None, [1])] == [1]
    assert parse_inventory(smi, None, None)[0].memory_mib == 143771


def test_vllm_command_on_a_placement() -> None:
    gpu = Platform("cpu", frozenset(), 16, 128.0, ("NVIDIA H200",))
    held = _fill(ONE, 1)
    args = apply_placement(VLLMArgs(env={"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}), held["r0"])
    cmd, env = build_command("/m", 8001, args, "r0", gpu)
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == str(held["r0"].share)
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["VLLM_DISABLED_KERNELS"] == "MacheteLinearKernel"
    cmd, _ = build_command("/m", 8001, VLLMArgs(tensor_parallel_size=2, data_parallel_size=2), "x", gpu)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert cmd[cmd.index("--data-parallel-size") + 1] == "2"
    cmd, _ = build_command("/m", 8001, VLLMArgs(), "x", gpu)  # on its own: most of the GPU
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.9" and "--data-parallel-size" not in cmd


def test_manager_records_placements_and_frees_them(data_home: Path, tmp_path: Path) -> None:
    """The manager's bookkeeping on a made-up GPU (no vLLM starts: a full GPU fails placement)."""
    model = tmp_path / "m"
    model.mkdir()
    store = ReleaseStore()
    manager = ReleaseManager(store, gpus=ONE)
    rels = [store.create(model, VLLMArgs(), release_id=f"r{i}") for i in range(4)]
    for rel in rels:
        manager._place(rel)
    recorded = store.get("r3").placement
    assert recorded["devices"] == [0] and recorded["share"] == 0.187
    # A fifth release does not fit: staging it fails cleanly (recorded, never started).
    failed = manager.stage(model, release_id="r4")
    assert failed.status == "failed" and "no devices for release r4" in failed.history[-1].reason
    manager._stop("r0")  # stopping a release gives its share back
    assert manager._place(store.create(model, VLLMArgs(), release_id="r5")).devices == (0,)
    manager.shutdown()
