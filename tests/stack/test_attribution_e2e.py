"""Attribution end to end: real cgroups, real processes, the real exporter, the kubelet stand-in, /metrics.

``python -m exporter --simulate healthy-8gpu --kubelet on --kubelet-socket S`` is told (simulator event)
that real processes, each moved into a real cgroup in one runtime's or workload manager's layout,
hold GPU memory; the stand-in serves the kubelet's PodResources API with the allocations. The scrape
must carry each process's owner, one ``gpu_allocation_info`` per holder (also for an allocated GPU with
no process), and ``gpu_exporter_attribution_up``; the kubelet going away keeps the exporter serving.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import pytest

from exporter.simulate import load_scenario
from harness.cgroups import Layout, layouts, placed, v2_root
from harness.kubelet import Container, KubeletStandIn, Pod
from harness.support import http_post_json, scrape, start_exporter, wait_until

pytestmark = pytest.mark.slow

HOST = "attr-node"
Samples = list[tuple[dict[str, str], float]]


# What each CgroupOwner field is called on /metrics.
LABEL_OF = {"container_id": "container_id", "pod_uid": "k8s_pod_uid", "slurm_job": "slurm_job",
            "slurm_step": "slurm_step", "systemd_unit": "systemd_unit"}
OTHER_GPUS = (1, 2, 3, 4, 6, 7)  # GPU 0: the allocated trainer alone; GPU 5: allocated, no process


def test_every_layout_and_the_kubelet_through_metrics(log_dir: Path) -> None:
    uuids = [g["uuid"] for g in load_scenario("healthy-8gpu").gpus]
    cases = [(1, layout) for layout in layouts(1)]
    if v2_root() is not None:  # the unified hierarchy, where this kernel offers one
        cases += [(2, layout) for layout in layouts(2)]
    trainer = next(lay for v, lay in cases if (v, lay.name) == (1, "containerd-systemd"))
    pods = [
        # The trainer pod holds GPU 0 (whole) and the pod "idle-1" holds GPU 5 with no process on it.
        Pod("ml", "bert-0", [Container("train", {"nvidia.com/gpu": [uuids[0]]})]),
        Pod("ml", "idle-1", [Container("main", {"nvidia.com/gpu": [uuids[5]]})]),
    ]
    with contextlib.ExitStack() as stack:
        sock = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kpr-", dir="/tmp"))) / "kubelet.sock"
        kubelet = stack.enter_context(KubeletStandIn(sock, pods))
        placed_on: dict[int, tuple[Layout, int]] = {}  # pid -> (layout, GPU)
        others = iter(OTHER_GPUS * 3)
        for version, layout in cases:
            pid = stack.enter_context(placed(layout, version))
            placed_on[pid] = (layout, 0 if layout is trainer else next(others))
        exporter, base = start_exporter(
            log_dir, "--simulate", "healthy-8gpu", "--interval", "0.2", "--host-label", HOST,
            "--docker", "off", "--kubelet", "on", "--kubelet-socket", str(sock),
        )
        stack.callback(exporter.stop)
        for pid, (_, gpu) in placed_on.items():
            status, text = http_post_json(f"{base}/-/simulate/events", {
                "gpu": gpu, "add_process": {"pid": pid, "type": "compute", "used_memory_bytes": "1GiB"}})
            assert status == 200, text
        trainer_pid = next(pid for pid, (lay, _) in placed_on.items() if lay is trainer)

        def attributed() -> dict[str, Samples] | None:
            m = scrape(base)
            procs = {int(s["pid"]): s for s, _ in m.get("gpu_process_memory_used_bytes", [])}
            ok = all(pid in procs for pid in placed_on) and procs[trainer_pid]["k8s_pod"]
            return m if ok else None

        m = wait_until(attributed, timeout=60, interval=0.2, message="attribution labels on /metrics")
        procs = {int(s["pid"]): s for s, _ in m["gpu_process_memory_used_bytes"]}
        for pid, (layout, gpu) in placed_on.items():
            labels = procs[pid]
            assert labels["gpu"] == str(gpu)
            for field, label in LABEL_OF.items():
                assert labels[label] == layout.expected.get(field, ""), (layout.name, label, labels)
            if layout is not trainer:  # no allocation joins them: no guessed Kubernetes names
                assert (labels["k8s_namespace"], labels["k8s_pod"], labels["k8s_container"]) == ("", "", ""), labels
        p = procs[trainer_pid]
        assert (p["k8s_namespace"], p["k8s_pod"], p["k8s_container"]) == ("ml", "bert-0", "train"), p
        # The container series carries the pod's names too.
        containers = {s["container_id"]: s for s, _ in m["gpu_container_memory_used_bytes"]}
        assert containers[trainer.expected["container_id"]]["k8s_pod"] == "bert-0"

        holders = {(s["gpu"], s["k8s_namespace"], s["k8s_pod"], s["k8s_container"], s["slurm_job"])
                   for s, _ in m["gpu_allocation_info"]}
        slurm_jobs = {(str(gpu), "", "", "", lay.expected["slurm_job"])
                      for lay, gpu in placed_on.values() if "slurm_job" in lay.expected}
        assert holders == {
            ("0", "ml", "bert-0", "train", ""),
            ("5", "ml", "idle-1", "main", ""),  # allocated, no process: still named
            *slurm_jobs,
        }, holders
        up = {s["source"]: v for s, v in m["gpu_exporter_attribution_up"]}
        assert up == {"cgroup": 1.0, "kubelet": 1.0}
        # Attribution labels never land on plain per-GPU series.
        assert all("k8s_pod" not in s for s, _ in m["gpu_utilization_ratio"])

        # The kubelet goes away: the exporter keeps serving and says so; the cgroup's labels stay.
        kubelet.stop()

        def kubelet_down() -> dict[str, Samples] | None:
            mm = scrape(base)
            up = {s["source"]: v for s, v in mm.get("gpu_exporter_attribution_up", [])}
            return mm if up.get("kubelet") == 0.0 else None

        m = wait_until(kubelet_down, timeout=60, interval=0.5, message="attribution_up{source=kubelet} 0")
        procs = {int(s["pid"]): s for s, _ in m["gpu_process_memory_used_bytes"]}
        for pid, (layout, _) in placed_on.items():  # every cgroup label is still there
            for field, label in LABEL_OF.items():
                assert procs[pid][label] == layout.expected.get(field, ""), (layout.name, label)
        assert exporter.alive
        assert "kubelet PodResources API" in exporter.log() and exporter.log().count("unavailable (") == 1
