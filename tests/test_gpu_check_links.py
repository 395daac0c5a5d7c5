"""The nvidia-smi parsers of benchmarks/gpu_check_links.py (the check itself needs a real GPU). The
samples follow nvidia-smi's documented output layout; they were not captured on this machine."""

from __future__ import annotations

from benchmarks.gpu_check_links import (
    parse_mig_uuids,
    parse_nvlink_errors,
    parse_nvlink_status,
    parse_recovery_action,
    parse_throttle_counters,
)


def test_nvlink_status_and_errors() -> None:
    status = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n\t Link 0: 26.562 GB/s\n\t Link 1: <inactive>\n"
    assert parse_nvlink_status(status) == {0: True, 1: False}
    errors = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n\t Link 0: Replay Errors: 3\n"
              "\t Link 0: Recovery Errors: 0\n\t Link 0: CRC Errors: 12\n\t Link 1: CRC Data Errors: 2\n"
              "\t Link 1: Effective Errors: 9\n")
    assert parse_nvlink_errors(errors) == {(0, "replay"): 3, (0, "recovery"): 0, (0, "crc_flit"): 12,
                                           (1, "crc_data"): 2}


def test_throttle_counters_recovery_action_and_mig() -> None:
    perf = ("    Clocks Event Reasons\n        Idle : Not Active\n    Clocks Event Reasons Counters\n"
            "        SW Power Capping : 1500000 us\n        Sync Boost : 0 us\n"
            "        HW Thermal Slowdown : 20 us\n    Sparse Operation Mode : N/A\n")
    assert parse_throttle_counters(perf) == {"power": 1.5, "sync_boost": 0.0}
    assert parse_throttle_counters("no counters here") == {}
    assert parse_recovery_action("    GPU Recovery Action : Drain and Reset\n") == "drain_and_reset"
    assert parse_recovery_action("    GPU Recovery Action : None\n") == "none"
    assert parse_recovery_action("nothing") is None
    listing = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5d1c)\n"
               "  MIG 1g.10gb     Device  0: (UUID: MIG-1a2b3c4d-0000-5555-aaaa-000000000001)\n"
               "  MIG 1g.10gb     Device  1: (UUID: MIG-1a2b3c4d-0000-5555-aaaa-000000000002)\n")
    assert parse_mig_uuids(listing) == {"MIG-1a2b3c4d-0000-5555-aaaa-000000000001",
                                        "MIG-1a2b3c4d-0000-5555-aaaa-000000000002"}
