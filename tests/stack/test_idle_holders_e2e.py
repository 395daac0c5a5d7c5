"""GpuIdleButAllocated names its holders, live: real processes in real cgroups, the sample training job
with the hook, the kubelet stand-in, the exporter, the real Prometheus (shipped fast rules) and
Alertmanager (shipped fast config), and the webhook receiver.

GPU 6 is held by a rank of the training job and by a process in a Slurm job's cgroup; GPU 7 is
allocated by the kubelet to a pod that runs nothing on it. Both go idle; each holder must arrive as
its own notification with pid / memory, job and rank, Slurm job, or pod/namespace/container.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.simulate import load_scenario
from harness.alert_stack import AlertStack, alert_stack, labels_match, start_workload
from harness.cgroups import layouts, placed
from harness.kubelet import Container, KubeletStandIn, Pod
from harness.support import http_post_json, scrape, wait_until

pytestmark = pytest.mark.slow

HOST = "holder-node"
SCENARIO = "healthy-8gpu"
SCENARIO_PID = 4242  # the scenario's own process on every GPU
# The fast profile averages utilization over 30 s before "idle" holds: generous on a busy machine.
FIRE_TIMEOUT = 150.0


@pytest.fixture(scope="module")
def kubelet_socket() -> Iterator[Path]:
    uuids = [g["uuid"] for g in load_scenario(SCENARIO).gpus]
    with tempfile.TemporaryDirectory(prefix="kpr-", dir="/tmp") as d:
        sock = Path(d) / "kubelet.sock"
        pods = [Pod("ml", "notebook-7", [Container("jupyter", {"nvidia.com/gpu": [uuids[7]]})])]
        with KubeletStandIn(sock, pods):
            yield sock


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kubelet_socket: Path) -> Iterator[AlertStack]:
    log_dir = tmp_path_factory.mktemp("holders-e2e")
    args = ["--simulate", SCENARIO, "--interval", "0.5", "--host-label", HOST, "--docker", "off",
            "--kubelet", "on", "--kubelet-socket", str(kubelet_socket)]
    with alert_stack(log_dir, args) as s:
        yield s


def simulate(stack: AlertStack, event: dict[str, object]) -> None:
    status, body = http_post_json(stack.exporter_url + "/-/simulate/events", event)
    assert status == 200, body


def test_idle_alert_names_every_holder(stack: AlertStack) -> None:
    slurm = next(lay for lay in layouts(1) if lay.name == "slurm-v1")
    job = slurm.expected["slurm_job"]
    with contextlib.ExitStack() as cleanup:
        slurm_pid = cleanup.enter_context(placed(slurm, 1))
        trainer = start_workload(stack, "holders")
        # The trainer's hook must have reported before its PID can carry job/rank.
        wait_until(lambda: any(s.get("training_job") == "holders" for s, _ in
                               scrape(stack.exporter_url).get("training_steps_total", [])),
                   timeout=90, interval=0.5, message="training hook reporting")
        for gpu in (6, 7):
            simulate(stack, {"gpu": gpu, "remove_process": SCENARIO_PID})
        simulate(stack, {"gpu": 6, "add_process": {"pid": trainer.pid, "type": "compute", "used_memory_bytes": "3GiB"}})
        simulate(stack, {"gpu": 6, "add_process": {"pid": slurm_pid, "type": "compute", "used_memory_bytes": "1GiB"}})
        for gpu in (6, 7):
            simulate(stack, {"gpu": gpu, "set": {"utilization_gpu_ratio": 0.0}})

        hook = stack.webhook
        _, rank = hook.wait_for_alert(labels_match(alertname="GpuIdleButAllocated", host=HOST, gpu="6",
                                                   pid=str(trainer.pid)), timeout=FIRE_TIMEOUT)
        assert (rank["labels"]["training_job"], rank["labels"]["rank"]) == ("holders", "0"), rank["labels"]
        assert f"pid {trainer.pid} holding 3GiB, training job holders rank 0" in rank["annotations"]["description"]

        _, in_job = hook.wait_for_alert(labels_match(alertname="GpuIdleButAllocated", host=HOST, gpu="6",
                                                     pid=str(slurm_pid)), timeout=FIRE_TIMEOUT)
        assert in_job["labels"]["slurm_job"] == job, in_job["labels"]
        assert f"pid {slurm_pid} holding 1GiB, Slurm job {job}." in in_job["annotations"]["description"]

        _, pod = hook.wait_for_alert(labels_match(alertname="GpuIdleButAllocated", host=HOST, gpu="7"),
                                     timeout=FIRE_TIMEOUT)
        labels = pod["labels"]
        assert (labels["k8s_namespace"], labels["k8s_pod"], labels["k8s_container"]) == ("ml", "notebook-7", "jupyter")
        assert "pid" not in labels
        assert "an allocation with no process, pod ml/notebook-7, container jupyter." in pod["annotations"]["description"]
        trainer.stop()
