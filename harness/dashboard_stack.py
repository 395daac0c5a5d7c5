"""A small live stack for the dashboards: the exporter on a simulated 8-GPU node, two ranks of the
sample workload reporting through the hook, and a real Prometheus scraping every second with the
alert rules loaded; faults are injected so every panel (XID, ECC, OOM, auth failures, idle GPUs,
firing alerts) has something to show. Used by tests/stack/test_dashboards_live.py and
scripts/render_dashboards.py.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from dashboards.live import Window, empty_queries, prom_api
from dashboards.queries import load_dashboards
from harness.support import (
    REPO_ROOT,
    ManagedProcess,
    free_port,
    http_get,
    http_post_json,
    start_exporter,
    start_prometheus,
    wait_until,
)

log = logging.getLogger(__name__)

HOST = "dash-node-1"
JOB = "dash-multitask"
SCENARIO = "healthy-8gpu"
SCRAPE_SECONDS = 1
# Grafana: $__rate_interval = max($__interval + scrape interval, 4 x scrape interval).
RATE_INTERVAL = f"{4 * SCRAPE_SECONDS + 1}s"
FAULT_GPU = "1"  # XID / ECC / remap / throttling land here; the GPU detail dashboard looks at it
JOB_GPUS = ("1", "2")  # the two ranks' processes are placed on these simulated GPUs
IDLE_GPU = "2"  # holds rank 1's process but is made idle: "idle but allocated"
LOST_GPU = "5"  # XID 79 ("fallen off the bus") makes it lost: "GPUs down" in the fleet
RECOVERY_GPU = 6  # its driver asks for a P2P drain: "Recovery actions requested" in the fleet
MIG_GPU = 7  # switched into MIG mode with three instances: the fleet's MIG panels
# The shipped rules, fast profile (same expressions, short `for:`): the alert panels read ALERTS.
ALERT_RULES = REPO_ROOT / "alerts" / "fast" / "gpu-exporter.rules.yml"
# The fleet roll-ups (one profile), which the Fleet roll-up dashboard reads.
FLEET_RULES = REPO_ROOT / "alerts" / "fleet.rules.yml"


class DashboardStack:
    """Context manager: start everything, inject faults, ``wait_for_data()``, stop everything."""

    def __init__(self, log_dir: Path, steps_delay: float = 0.05) -> None:
        self.log_dir = log_dir
        self.steps_delay = steps_delay
        self.procs: list[ManagedProcess] = []
        self.exporter = ""
        self.prometheus = ""
        self.started = 0.0
        self.prefer = {"host": HOST, "gpu": FAULT_GPU, "training_job": JOB}

    def __enter__(self) -> DashboardStack:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (last 3000 chars)\n{p.log()[-3000:]}" for p in self.procs)

    def _start(self) -> None:
        self.started = time.time()
        exporter, self.exporter = start_exporter(
            self.log_dir, "--simulate", SCENARIO, "--interval", "0.5", "--host-label", HOST, "--docker", "off"
        )
        self.procs.append(exporter)
        rule_files = [str(ALERT_RULES), str(FLEET_RULES)]
        target = self.exporter.removeprefix("http://")
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
            "rule_files": rule_files,
            "scrape_configs": [{"job_name": "gpu-exporter", "static_configs": [{"targets": [target]}]}],
        }
        prom, self.prometheus = start_prometheus(self.log_dir, json.dumps(config))
        self.procs.append(prom)
        self._start_workload()
        self._inject_gpu_faults()

    def _start_workload(self) -> None:
        """Two ranks (torchrun-style env, gloo on CPU); rank 1 is a slow straggler; OOM, NaN, auth faults.

        The OOM and NaN faults come late (>= 5 s in): Prometheus must have scraped their counters at 0
        first, or ``increase()`` has only one sample and the OOM annotation/stat stay empty."""
        port = free_port()
        for rank in (0, 1):
            env = {
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "GPU_EXPORTER_URL": self.exporter, "OMP_NUM_THREADS": "1",
            }
            argv = [
                sys.executable, "-m", "harness.fake_allocator_train",
                "--steps", "0", "--duration", "600", "--device", "cpu", "--job", JOB,
                "--push-interval", "0.5", "--step-delay", str(self.steps_delay), "--log-every", "0",
                "--fault", "oom@100", "--fault", "nan@110:2", "--fault", "auth@8", "--fault", "slow-rank@1:2",
            ]
            self.procs.append(ManagedProcess(f"train-rank{rank}", argv, self.log_dir, env=env))

    def _pids(self) -> dict[str, int]:
        """rank -> host PID of the workload processes, once the exporter has heard from both."""
        status, body = http_get(f"{self.exporter}/metrics")
        assert status == 200, body
        pids = {}
        for line in body.splitlines():
            if line.startswith("training_info{") and f'training_job="{JOB}"' in line:
                labels = dict(part.split("=", 1) for part in line[line.index("{") + 1: line.rindex("}")].split(","))
                pids[labels["rank"].strip('"')] = int(labels["pid"].strip('"'))
        return pids if len(pids) == 2 else {}

    def _event(self, event: dict[str, Any]) -> None:
        status, body = http_post_json(f"{self.exporter}/-/simulate/events", event)
        assert status == 200, f"simulator refused {event}: {status} {body}"

    def _inject_gpu_faults(self) -> None:
        """Place the ranks on simulated GPUs (by PID, so the hook's job joins them) and break GPU 1."""
        pids = wait_until(self._pids, timeout=60, interval=0.5, message="both workload ranks reporting")
        # Faults only once Prometheus holds the healthy values: an increase() needs the "before" sample.
        wait_until(lambda: prom_api(self.prometheus, "query", {"query": "count_over_time(gpu_up[1m]) >= 2"})["result"],
                   timeout=30, interval=0.5, message="Prometheus scraped the healthy fleet twice")
        for rank, gpu in zip(("0", "1"), JOB_GPUS, strict=True):
            self._event({"gpu": int(gpu), "add_process": {"pid": pids[rank], "type": "compute",
                                                          "used_memory_bytes": "9GiB", "name": "python"}})
        self._event({"gpu": int(IDLE_GPU), "set": {"utilization_gpu_ratio": 0.0}})
        # Something moving for the previews: GPU 3 heats up towards its slowdown threshold.
        self._event({"gpu": 3, "ramp": {"temperature_gpu_celsius": 86, "power_usage_watts": 690},
                     "duration_seconds": 60})
        # Not 79 on FAULT_GPU: that XID also loses the GPU, and a lost GPU has no series to look at.
        self._event({"gpu": int(FAULT_GPU), "xid": 48})
        self._event({"gpu": int(LOST_GPU), "xid": 79})
        self._event({"gpu": int(FAULT_GPU), "add_ecc_errors": {"corrected": 3, "uncorrected": 1}})
        self._event({"gpu": int(FAULT_GPU), "set": {
            "pcie_replay_errors": 5,
            "remapped_rows": {"correctable": 1, "uncorrectable": 2},
            "remapped_rows_pending": True,
            "clock_event_reasons": ["sw_power_cap", "hw_thermal_slowdown"],
            # Link faults: NVLink link 3 down, link 4 taking CRC errors, the PCIe link down to Gen3 x8.
            "nvlink_links_down": [3],
            "nvlink_error_rates": {4: {"crc_flit": 50, "replay": 5}},
            "pcie_link_generation": 3,
            "pcie_link_width_lanes": 8,
            "pcie_errors": {"correctable": 40},
        }})
        self._event({"gpu": RECOVERY_GPU, "set": {"recovery_action": "drain_p2p"}})
        self._event({"gpu": MIG_GPU, "set": {
            "mig_mode": "enabled",
            "mig_instances": [
                {"gpu_instance": gi, "compute_instance": 0, "profile": "2g.20gb", "memory_total_bytes": "20GiB",
                 "gpm_ratios": {"sm_active": 0.5, "tensor_active": 0.3, "dram_bandwidth": 0.2}}
                for gi in (3, 4, 5)],
            "processes": [{"pid": 7700 + gi, "type": "compute", "used_memory_bytes": "12GiB", "gpu_instance": gi,
                           "compute_instance": 0} for gi in (3, 4, 5)],
        }})

    def problems(self, window: Window) -> list[str]:
        """Queries of all three dashboards that return no data in ``window``."""
        out: list[str] = []
        for dash in load_dashboards().values():
            out.extend(empty_queries(self.prometheus, dash, window, self.prefer))
        return out

    def window(self) -> Window:
        now = time.time()
        return Window(self.started, now, 1.0, RATE_INTERVAL)

    def wait_for_data(self, timeout: float = 90.0) -> Window:
        """Poll until every panel query of every dashboard returns data; fail listing those that do not."""
        deadline = time.monotonic() + timeout
        problems: list[str] = []
        while time.monotonic() < deadline:
            for p in self.procs:
                assert p.alive(), f"{p.name} exited:\n{p.log()[-3000:]}"
            window = self.window()
            problems = self.problems(window)
            if not problems:
                return window
            time.sleep(2)
        raise AssertionError(
            f"{len(problems)} dashboard queries returned no data within {timeout:.0f}s:\n  "
            + "\n  ".join(problems)
        )
