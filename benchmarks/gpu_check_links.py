"""GPU check (real GPU only): the link, throttle-time, recovery-action and MIG series against nvidia-smi.

Part of ``benchmarks/gpu_check.py``. Compares, GPU by GPU (matched by UUID):

- PCIe link: ``nvidia-smi --query-gpu=pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,
  pcie.link.width.max`` (and ``pcie.link.gen.gpumax`` where that nvidia-smi knows it) with
  ``gpu_pcie_link_*``. The current generation may change between the two reads on an idle GPU, so it
  gets a tolerance of one generation; maxima and widths must match.
- NVLink: ``nvidia-smi nvlink -s`` (link up / ``<inactive>``) with ``gpu_nvlink_up``, and ``nvidia-smi
  nvlink -e`` (replay / recovery / CRC counters) with ``gpu_nvlink_errors_total``: the exporter's value
  (up to one poll old) must not exceed nvidia-smi's, read after it, nor trail it by much.
- Throttle time: the "Clocks Event Reasons Counters" of ``nvidia-smi -q -d PERFORMANCE`` (newer drivers)
  for SW power capping and sync boost, the two whose field ids are documented aliases of ours.
- Recovery action: the "Recovery Action" line of ``nvidia-smi -q``, when that driver prints one.
- MIG: the MIG device UUIDs of ``nvidia-smi -L`` with ``gpu_mig_info``.

The parsers are written against nvidia-smi output as documented and seen on R535-R570 drivers; a
section nvidia-smi does not print is reported as "not shown", not as a failure. Nothing here ran on a
real GPU in CI.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from typing import Any

Series = dict[str, list[tuple[dict[str, str], float]]]

PCIE_QUERY = {  # nvidia-smi field -> (exporter metric, tolerance)
    "pcie.link.gen.current": ("gpu_pcie_link_generation", 1.0),
    "pcie.link.gen.max": ("gpu_pcie_link_generation_max", 0.0),
    "pcie.link.width.current": ("gpu_pcie_link_width_lanes", 0.0),
    "pcie.link.width.max": ("gpu_pcie_link_width_max_lanes", 0.0),
}
PCIE_GPUMAX = ("pcie.link.gen.gpumax", "gpu_pcie_link_generation_device_max")
_NVLINK_ERROR_NAMES = {"replay": "replay", "recovery": "recovery", "crc": "crc_flit", "crc flit": "crc_flit",
                       "crc data": "crc_data", "crc data flit": "crc_data"}
_THROTTLE_NAMES = {"sw power capping": "power", "sw power cap": "power", "sync boost": "sync_boost"}


def parse_nvlink_status(text: str) -> dict[int, bool]:
    """``nvidia-smi nvlink -s -i N``: ``Link 3: 26.562 GB/s`` (up) or ``Link 3: <inactive>`` -> link -> up."""
    out: dict[int, bool] = {}
    for m in re.finditer(r"^\s*Link (\d+):\s*(.+?)\s*$", text, re.MULTILINE):
        out[int(m.group(1))] = "inactive" not in m.group(2).lower()
    return out


def parse_nvlink_errors(text: str) -> dict[tuple[int, str], int]:
    """``nvidia-smi nvlink -e -i N``: ``Link 0: Replay Errors: 0`` -> (link, our error name) -> count."""
    out: dict[tuple[int, str], int] = {}
    for m in re.finditer(r"^\s*Link (\d+):\s*(.+?)\s+Errors?\s*:\s*(\d+)\s*$", text, re.MULTILINE | re.IGNORECASE):
        name = _NVLINK_ERROR_NAMES.get(m.group(2).strip().lower())
        if name is not None:
            out[(int(m.group(1)), name)] = int(m.group(3))
    return out


def parse_throttle_counters(text: str) -> dict[str, float]:
    """The "Clocks Event Reasons Counters" block of ``nvidia-smi -q -d PERFORMANCE`` -> reason -> seconds."""
    out: dict[str, float] = {}
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().endswith("Counters")), None)
    for line in lines[start + 1:] if start is not None else []:
        m = re.match(r"^\s*(.+?)\s*:\s*(\d+)\s*us\s*$", line)
        if m is None:
            break  # the next section
        name = _THROTTLE_NAMES.get(m.group(1).strip().lower())
        if name is not None:
            out[name] = int(m.group(2)) * 1e-6
    return out


def parse_recovery_action(text: str) -> str | None:
    """``GPU Recovery Action : None`` (``nvidia-smi -q``) -> "none", "gpu_reset", ..."""
    m = re.search(r"Recovery Action\s*:\s*(.+)", text)
    return re.sub(r"[^a-z0-9]+", "_", m.group(1).strip().lower()).strip("_") if m else None


def parse_mig_uuids(text: str) -> set[str]:
    """``nvidia-smi -L``: every ``(UUID: MIG-...)``."""
    return set(re.findall(r"UUID:\s*(MIG-[0-9a-fA-F-]+)", text))


def _smi(*args: str) -> tuple[int, str]:
    r = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def _find(series: Series, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [(lab, v) for lab, v in series.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]


def check_links_vs_smi(scrape: Callable[[], Series]) -> dict[str, Any]:
    """Run every comparison above against the exporter's /metrics (``scrape()``)."""
    series = scrape()
    index_by_uuid = {lab["uuid"]: lab["gpu"] for lab, _ in series.get("gpu_info", [])}
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    notes: list[str] = []

    def compare(gpu: str, what: str, smi: float | None, ours: list[float], ok: bool) -> None:
        rows.append({"gpu": gpu, "field": what, "smi": smi, "exporter": ours, "ok": ok})
        if not ok:
            failures.append(f"gpu {gpu} {what}: nvidia-smi {smi}, exporter {ours}")

    # PCIe link
    fields = ["uuid", *PCIE_QUERY]
    rc, out = _smi(f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits")
    if rc != 0:
        failures.append(f"nvidia-smi --query-gpu (PCIe link) failed: {out.strip()[:300]}")
    else:
        for line in out.strip().splitlines():
            values = [v.strip() for v in line.split(",")]
            uuid, gpu = values[0], index_by_uuid.get(values[0], "?")
            for (field, (metric, tol)), raw in zip(PCIE_QUERY.items(), values[1:], strict=True):
                ours = [v for _, v in _find(series, metric, uuid=uuid)]
                if not raw.replace(".", "").isdigit():
                    compare(gpu, field, None, ours, not ours)  # [N/A]: the exporter must have no series
                    continue
                compare(gpu, field, float(raw), ours, len(ours) == 1 and abs(ours[0] - float(raw)) <= tol)
    rc, out = _smi(f"--query-gpu=uuid,{PCIE_GPUMAX[0]}", "--format=csv,noheader,nounits")
    if rc == 0:
        for line in out.strip().splitlines():
            uuid, raw = (v.strip() for v in line.split(",", 1))
            ours = [v for _, v in _find(series, PCIE_GPUMAX[1], uuid=uuid)]
            if raw.isdigit():
                compare(index_by_uuid.get(uuid, "?"), PCIE_GPUMAX[0], float(raw), ours, ours == [float(raw)])
    else:
        notes.append(f"{PCIE_GPUMAX[0]}: not known to this nvidia-smi")

    # NVLink, throttle counters and recovery action, per GPU
    for uuid, gpu in sorted(index_by_uuid.items(), key=lambda kv: int(kv[1])):
        rc, out = _smi("nvlink", "-s", "-i", gpu)
        smi_links = parse_nvlink_status(out) if rc == 0 else {}
        ours_links = {int(lab["link"]): v == 1 for lab, v in _find(series, "gpu_nvlink_up", uuid=uuid)}
        if smi_links or ours_links:
            compare(gpu, "nvlink -s (link up)", None, [], smi_links == ours_links)
            if smi_links != ours_links:
                failures[-1] += f" (nvidia-smi {smi_links}, exporter {ours_links})"
        rc, out = _smi("nvlink", "-e", "-i", gpu)
        after = scrape()  # nvidia-smi read between two scrapes: ours must lie between them
        for (link, error), smi_count in sorted((parse_nvlink_errors(out) if rc == 0 else {}).items()):
            before_v = [v for _, v in _find(series, "gpu_nvlink_errors_total", uuid=uuid, link=str(link), error=error)]
            after_v = [v for _, v in _find(after, "gpu_nvlink_errors_total", uuid=uuid, link=str(link), error=error)]
            ok = bool(before_v and after_v) and before_v[0] - 1 <= smi_count <= after_v[0] + 1 + 0.01 * smi_count
            compare(gpu, f"nvlink -e link {link} {error}", smi_count, before_v + after_v, ok)
        rc, out = _smi("-q", "-d", "PERFORMANCE", "-i", gpu)
        counters = parse_throttle_counters(out) if rc == 0 else {}
        if not counters:
            notes.append(f"gpu {gpu}: nvidia-smi shows no clocks-event counters")
        for reason, seconds in counters.items():
            ours = [v for _, v in _find(series, "gpu_clock_throttle_seconds_total", uuid=uuid, reason=reason)]
            ok = len(ours) == 1 and abs(ours[0] - seconds) <= max(5.0, 0.05 * seconds)
            compare(gpu, f"throttle {reason} (s)", seconds, ours, ok)
        rc, out = _smi("-q", "-i", gpu)
        action = parse_recovery_action(out) if rc == 0 else None
        ours_action = [lab["action"] for lab, _ in _find(series, "gpu_recovery_action", uuid=uuid)]
        if action is None:
            notes.append(f"gpu {gpu}: nvidia-smi -q shows no recovery action (exporter: {ours_action})")
        else:
            rows.append({"gpu": gpu, "field": "recovery action", "smi": action, "exporter": ours_action,
                         "ok": ours_action == [action]})
            if ours_action != [action]:
                failures.append(f"gpu {gpu} recovery action: nvidia-smi {action}, exporter {ours_action}")

    # MIG devices
    rc, out = _smi("-L")
    smi_mig = parse_mig_uuids(out) if rc == 0 else set()
    ours_mig = {lab["mig_uuid"] for lab, _ in series.get("gpu_mig_info", [])}
    rows.append({"gpu": "*", "field": "MIG device UUIDs", "smi": sorted(smi_mig), "exporter": sorted(ours_mig),
                 "ok": smi_mig == ours_mig})
    if smi_mig != ours_mig:
        failures.append(f"MIG devices: nvidia-smi {sorted(smi_mig)}, exporter {sorted(ours_mig)}")
    return {"rows": rows, "failures": failures, "notes": notes}
