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
from harness.cgroups import layouts, placed
from harness.kubelet import Container, KubeletStandIn, Pod
from harness.support import http_post_json, scrape, start_exporter, wait_until

pytestmark = pytest.mark.slow

HOST = "attr-node"
Samples = list[tuple[dict[str, str], float]]


def test_every_layout_and_the_kubelet_through_metrics(log_dir: Path) -> None:
    uuids = [g["uuid"] for g in load_scenario("healthy-8gpu").gpus]
    by_name = {layout.name: layout for layout in layouts(1)}
    containerd, crio = by_name["containerd-systemd"], by_name["crio-systemd"]
    slurm, unit, docker = by_name["slurm-v1"], by_name["systemd-unit"], by_name["docker-cgroupfs"]
    pods = [
        # The trainer pod holds GPU 0 (whole) and the pod "idle-1" holds GPU 5 with no process on it.
        Pod("ml", "bert-0", [Container("train", {"nvidia.com/gpu": [uuids[0]]})]),
        Pod("ml", "idle-1", [Container("main", {"nvidia.com/gpu": [uuids[5]]})]),
    ]
    with contextlib.ExitStack() as stack:
        sock = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kpr-", dir="/tmp"))) / "kubelet.sock"
        kubelet = stack.enter_context(KubeletStandIn(sock, pods))
        pids = {name: stack.enter_context(placed(by_name[name], 1)) for name in by_name}
        exporter, base = start_exporter(
            log_dir, "--simulate", "healthy-8gpu", "--interval", "0.2", "--host-label", HOST,
            "--docker", "off", "--kubelet", "on", "--kubelet-socket", str(sock),
        )
        stack.callback(exporter.stop)
        placement = {"containerd-systemd": 0, "crio-systemd": 1, "slurm-v1": 2, "systemd-unit": 3, "docker-cgroupfs": 4}
        for name, gpu in placement.items():
            status, text = http_post_json(f"{base}/-/simulate/events", {
                "gpu": gpu, "add_process": {"pid": pids[name], "type": "compute", "used_memory_bytes": "1GiB"}})
            assert status == 200, text

        def attributed() -> dict[str, Samples] | None:
            m = scrape(base)
            procs = {int(s["pid"]): s for s, _ in m.get("gpu_process_memory_used_bytes", [])}
            ok = all(pids[n] in procs for n in placement) and procs[pids["containerd-systemd"]]["k8s_pod"]
            return m if ok else None

        m = wait_until(attributed, timeout=60, interval=0.2, message="attribution labels on /metrics")
        procs = {int(s["pid"]): s for s, _ in m["gpu_process_memory_used_bytes"]}
        p = procs[pids["containerd-systemd"]]
        assert (p["k8s_namespace"], p["k8s_pod"], p["k8s_container"]) == ("ml", "bert-0", "train"), p
        assert (p["container_id"], p["k8s_pod_uid"]) == (containerd.expected["container_id"], containerd.expected["pod_uid"]), p
        # A pod without a device allocation: pod UID and container id from the cgroup, no guessed names.
        p = procs[pids["crio-systemd"]]
        assert (p["k8s_pod_uid"], p["container_id"], p["k8s_pod"]) == (crio.expected["pod_uid"], crio.expected["container_id"], ""), p
        p = procs[pids["slurm-v1"]]
        assert (p["slurm_job"], p["slurm_step"]) == (slurm.expected["slurm_job"], "0"), p
        assert procs[pids["systemd-unit"]]["systemd_unit"] == unit.expected["systemd_unit"]
        assert procs[pids["docker-cgroupfs"]]["container_id"] == docker.expected["container_id"]
        # The container series carries the pod's names too.
        containers = {s["container_id"]: s for s, _ in m["gpu_container_memory_used_bytes"]}
        assert containers[containerd.expected["container_id"]]["k8s_pod"] == "bert-0"

        holders = {(s["gpu"], s["k8s_namespace"], s["k8s_pod"], s["k8s_container"], s["slurm_job"])
                   for s, _ in m["gpu_allocation_info"]}
        assert holders == {
            ("0", "ml", "bert-0", "train", ""),
            ("5", "ml", "idle-1", "main", ""),  # allocated, no process: still named
            ("2", "", "", "", slurm.expected["slurm_job"]),
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
        assert procs[pids["slurm-v1"]]["slurm_job"] == slurm.expected["slurm_job"]
        assert procs[pids["containerd-systemd"]]["k8s_pod_uid"] == containerd.expected["pod_uid"]
        assert exporter.alive
        assert "kubelet PodResources API" in exporter.log() and exporter.log().count("unavailable (") == 1
