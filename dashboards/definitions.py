"""The three dashboards: Fleet, GPU detail and Training job.

Queries use only names from docs/metrics.md. Template variables are always matched with ``=~`` so
multi-value and "All" selections work; counters only ever appear inside ``rate``/``increase`` with
``$__rate_interval`` (or ``$__range`` for "over the picked time range" totals).
"""

from __future__ import annotations

from dashboards.fleet_rollup import fleet_rollup
from dashboards.grafana import (
    DATASOURCE,
    FLEET_UID,
    GPU_UID,
    TRAINING_UID,
    Json,
    dashboard,
    gpu_detail_link,
    query_var,
    row,
    stat,
    table,
    target,
    thresholds,
    timeseries,
    training_link,
)

# Utilization below this share on a GPU that holds a compute process counts as "idle but allocated"
# (alerts/thresholds.yml idle_utilization_ratio_max; the panels show now, the alert waits 1 h).
IDLE_UTILIZATION = 0.05

FLEET_SEL = 'host=~"$host", gpu=~"$gpu"'
GPU_SEL = 'host=~"$host", gpu=~"$gpu"'
JOB_SEL = 'training_job=~"$training_job", host=~"$host", rank=~"$rank"'
GPU_LEGEND = "{{host}} gpu {{gpu}}"
SERIES_GPU_LINK = gpu_detail_link("${__field.labels.host}", "${__field.labels.gpu}")
ROW_GPU_LINK = gpu_detail_link("${__data.fields.host}", "${__data.fields.gpu}")

NO_THRESHOLDS = thresholds()  # a single base color: "no limit applies here" stated explicitly
TEMP_THRESHOLDS = thresholds((80, "orange"), (90, "red"))
ERROR_THRESHOLDS = thresholds((1, "red"))


def _new_or_increase(metric: str, sel: str) -> str:
    """Events per interval of a counter whose series is born with its first event (one per XID code,
    per auth status code). ``increase()`` alone never counts that first event (it needs a sample
    before it), so a series that did not exist one interval ago contributes its whole value.
    """
    m = f"{metric}{{{sel}}}"
    return f"(({m} unless {m} offset $__rate_interval) or increase({m}[$__rate_interval]))"


# Who holds a GPU: the labels the idle-but-allocated list shows (alerts/rules.in.yml names the same).
HOLDER_LABELS = ("pid", "training_job", "rank", "k8s_namespace", "k8s_pod", "k8s_container", "k8s_pod_uid",
                 "container_name", "slurm_job", "systemd_unit")
ALLOCATION_HOLDER_LABELS = ("k8s_namespace", "k8s_pod", "k8s_container", "slurm_job")


def _idle_holders(sel: str) -> str:
    """One row per holder of a GPU with (almost) no SM activity: each compute process (value: memory
    held) or, on a GPU allocated with no process, each allocation (value 0)."""
    procs = (f"max by (host, gpu, {', '.join(HOLDER_LABELS)}) "
             f'(gpu_process_memory_used_bytes{{{sel}, process_type="compute"}})')
    allocs = f"0 * max by (host, gpu, {', '.join(ALLOCATION_HOLDER_LABELS)}) (gpu_allocation_info{{{sel}}})"
    return (
        f"({procs} or on (host, gpu) {allocs})"
        f" and on (host, gpu) (max by (host, gpu) (gpu_utilization_ratio{{{sel}}}) < {IDLE_UTILIZATION})"
    )


def fleet() -> Json:
    s = FLEET_SEL
    panels = [
        row("At a glance"),
        stat("GPUs up", [target(f"sum(gpu_up{{{s}}})", "up")], unit="none",
             thr=thresholds(base="green"), description="GPUs that answered the last NVML poll."),
        stat("GPUs down", [
            target(f"sum(1 - gpu_up{{{s}}})", "GPUs not answering"),
            target('sum(1 - gpu_exporter_nvml_up{host=~"$host"})', "hosts with NVML down"),
        ], unit="none", thr=ERROR_THRESHOLDS,
            description="GPUs known to the exporter that failed their last poll, and hosts whose NVML is down."),
        stat("Firing alerts", [target('count(ALERTS{alertstate="firing", host=~"$host|"})', "firing")],
             unit="none", thr=thresholds((2, "orange")),
             description="Alerts firing now (the always-firing Watchdog counts as one)."),
        stat("Idle but allocated GPUs", [target(f"count(count by (host, gpu) ({_idle_holders(s)}))", "idle")],
             unit="none", thr=thresholds((1, "orange")),
             description=f"GPUs held by a compute process or an allocation with utilization below {IDLE_UTILIZATION:.0%}."),
        stat("Average utilization", [target(f"avg(gpu_utilization_ratio{{{s}}})", "avg")],
             unit="percentunit", minimum=0, maximum=1, thr=thresholds((0.3, "green"), base="orange")),
        stat("Energy used (time range)", [
            target(f"sum(increase(gpu_energy_consumed_joules_total{{{s}}}[$__range])) / 3600000", "kWh"),
        ], unit="kwatth", thr=NO_THRESHOLDS, description="Energy all selected GPUs used in the picked range."),
        row("Utilization and memory"),
        timeseries("GPU utilization", [target(f"gpu_utilization_ratio{{{s}}}", GPU_LEGEND)],
                   unit="percentunit", minimum=0, maximum=1, thr=thresholds((0.95, "orange")),
                   links=[SERIES_GPU_LINK], description="SM busy share per GPU."),
        timeseries("Memory used", [
            target(f"gpu_memory_used_bytes{{{s}}} / gpu_memory_total_bytes{{{s}}}", GPU_LEGEND),
        ], unit="percentunit", minimum=0, maximum=1, thr=thresholds((0.95, "orange"), (0.99, "red")),
            links=[SERIES_GPU_LINK], description="Framebuffer memory used, share of the card."),
        row("Thermals, power and throttling"),
        timeseries("Temperature", [target(f"gpu_temperature_celsius{{{s}}}", GPU_LEGEND)],
                   unit="celsius", thr=TEMP_THRESHOLDS, links=[SERIES_GPU_LINK], w=8),
        timeseries("Power draw (share of limit)", [
            target(f"gpu_power_usage_watts{{{s}}} / gpu_power_limit_watts{{{s}}}", GPU_LEGEND),
        ], unit="percentunit", minimum=0, thr=thresholds((0.95, "orange")), links=[SERIES_GPU_LINK], w=8),
        timeseries("Throttled GPUs by reason", [
            target(f'sum by (reason) (gpu_clock_event_active{{{s}, reason!="gpu_idle"}})', "{{reason}}"),
        ], unit="none", minimum=0, thr=thresholds((1, "orange")), stepped=True, w=8,
            description="How many GPUs have each clock-event (throttle) reason active; idle is left out."),
        row("Errors"),
        timeseries("XID errors", [
            target(f"sum by (host, gpu, xid) {_new_or_increase('gpu_xid_errors_total', s)}",
                   "{{host}} gpu {{gpu}} xid {{xid}}"),
        ], unit="none", minimum=0, thr=ERROR_THRESHOLDS, links=[SERIES_GPU_LINK], w=8),
        timeseries("ECC errors", [
            target(f'sum by (host, gpu, error_type) (increase(gpu_ecc_errors_total{{{s}, counter="volatile"}}'
                   f"[$__rate_interval]))", "{{host}} gpu {{gpu}} {{error_type}}"),
        ], unit="none", minimum=0, thr=ERROR_THRESHOLDS, links=[SERIES_GPU_LINK], w=8),
        timeseries("Row remapping", [
            target(f'gpu_remapped_rows{{{s}, kind="uncorrectable"}}', "{{host}} gpu {{gpu}} uncorrectable rows"),
            target(f"gpu_remapped_rows_pending{{{s}}} + gpu_remapped_rows_failure{{{s}}}",
                   "{{host}} gpu {{gpu}} pending + failed"),
        ], unit="none", minimum=0, thr=ERROR_THRESHOLDS, links=[SERIES_GPU_LINK], w=8,
            description="Uncorrectable remapped rows; a pending remap needs a GPU reset, a failed one service."),
        row("Links, throttle time and recovery"),
        stat("GPUs asking for recovery", [
            target(f'count(gpu_recovery_action{{{s}, action!="none"}}) or vector(0)', "GPUs"),
        ], unit="none", thr=ERROR_THRESHOLDS,
            description="GPUs whose driver asks for a reset, reboot or drain (the table below names the action)."),
        stat("NVLink links down", [
            target(f"count(gpu_nvlink_up{{{s}}} == 0 and on (host, gpu) "
                   f"count by (host, gpu) (gpu_nvlink_up{{{s}}} == 1)) or vector(0)", "links"),
        ], unit="none", thr=ERROR_THRESHOLDS,
            description="Inactive links on GPUs whose other links are up (a board without NVLink bridges is left out)."),
        stat("PCIe links degraded", [
            target(f"count(gpu_pcie_link_width_lanes{{{s}}} < gpu_pcie_link_width_max_lanes{{{s}}}) or vector(0)",
                   "narrow"),
        ], unit="none", thr=thresholds((1, "orange")),
            description="GPUs whose PCIe link trained narrower than the slot and card allow."),
        table("Recovery actions requested", [target(f'gpu_recovery_action{{{s}, action!="none"}}', table=True)],
              unit="none", thr=NO_THRESHOLDS, hide=("Time", "Value", "__name__"), links=[ROW_GPU_LINK], w=12,
              h=4, description="What the driver asks for, per GPU. Click a row for the GPU detail dashboard."),
        timeseries("NVLink errors per GPU", [
            target(f"sum by (host, gpu) (rate(gpu_nvlink_errors_total{{{s}}}[$__rate_interval]))", GPU_LEGEND),
        ], unit="short", minimum=0, thr=thresholds((1, "orange")), links=[SERIES_GPU_LINK], w=12,
            description="CRC, replay and recovery errors per second over all links of each GPU."),
        timeseries("Throttled time share", [
            target(f'max by (host, gpu) (rate(gpu_clock_throttle_seconds_total{{{s}, reason=~"power|thermal|board_limit|reliability"}}[$__rate_interval]))',
                   GPU_LEGEND),
        ], unit="percentunit", minimum=0, maximum=1, thr=thresholds((0.3, "orange")), links=[SERIES_GPU_LINK],
            w=12, description="Share of time each GPU's clocks were held down (largest reason), from NVML's "
                              "cumulative throttle counters: every throttled millisecond, not a sample."),
        row("MIG instances"),
        table("MIG devices", [target(f"gpu_mig_info{{{s}}}", table=True)], unit="none", thr=NO_THRESHOLDS,
              hide=("Time", "Value", "__name__"), links=[ROW_GPU_LINK], w=12,
              description="GPU and compute instances of GPUs in MIG mode, with their profiles."),
        timeseries("MIG instance memory used", [
            target(f"gpu_mig_memory_used_bytes{{{s}}} / gpu_mig_memory_total_bytes{{{s}}}",
                   "{{host}} gpu {{gpu}} instance {{gpu_instance}}"),
        ], unit="percentunit", minimum=0, maximum=1, thr=thresholds((0.95, "orange")), links=[SERIES_GPU_LINK],
            w=12, description="Memory used per MIG GPU instance, share of the instance (it cannot borrow more)."),
        row("Lists"),
        table("Firing alerts", [target('ALERTS{alertstate="firing", host=~"$host|"}', table=True)],
              unit="none", thr=NO_THRESHOLDS, hide=("Time", "Value", "__name__", "alertstate"), w=12),
        table("Idle but allocated GPUs: holders", [target(_idle_holders(s), table=True)], unit="bytes",
              thr=NO_THRESHOLDS, hide=("Time",), links=[ROW_GPU_LINK], w=12,
              description="One row per holder of an idle GPU: process (pid, training job/rank, pod, container, "
                          "Slurm job, unit) or allocation with no process. Value: GPU memory held. Click a row "
                          "for the GPU detail dashboard."),
        table("GPU inventory", [target(f"gpu_info{{{s}}}", table=True)], unit="none", thr=NO_THRESHOLDS,
              hide=("Time", "Value", "__name__"), links=[ROW_GPU_LINK],
              description="Every GPU with its model, driver and PCI address. Click a row for details."),
    ]
    variables = [
        query_var("host", "Host", "label_values(gpu_up, host)", multi=True, include_all=True),
        query_var("gpu", "GPU", 'label_values(gpu_up{host=~"$host"}, gpu)', multi=True, include_all=True),
    ]
    return dashboard(FLEET_UID, "GPU fleet", "Every host and GPU at a glance.", variables, panels)


def gpu_detail() -> Json:
    s = GPU_SEL
    panels = [
        row("Identity"),
        table("GPU", [target(f"gpu_info{{{s}}}", table=True)], unit="none", thr=NO_THRESHOLDS,
              hide=("Time", "Value", "__name__"), w=16, h=4),
        stat("Up", [target(f"gpu_up{{{s}}}", "up")], unit="none", thr=thresholds((1, "green"), base="red"),
             w=4),
        stat("Performance state", [target(f"gpu_performance_state{{{s}}}", "P-state")], unit="none",
             thr=thresholds((8, "orange")), w=4, description="P0 is full performance, P15 the lowest."),
        stat("Recovery action", [target(f"gpu_recovery_action{{{s}}}", "{{action}}")], unit="none",
             thr=NO_THRESHOLDS, w=24, h=3,
             description="What the driver asks to be done to this GPU (none, gpu_reset, node_reboot, drain_p2p, ...)."),
        row("Clocks and throttling"),
        timeseries("Clocks", [
            target(f"gpu_clock_hertz{{{s}}}", "{{clock}}"),
            target(f"gpu_clock_max_hertz{{{s}}}", "{{clock}} max"),
        ], unit="hertz", minimum=0, thr=NO_THRESHOLDS),
        timeseries("Throttle reasons", [target(f"gpu_clock_event_active{{{s}}}", "{{reason}}")],
                   unit="none", minimum=0, maximum=1, stepped=True, thr=thresholds((1, "orange")),
                   description="1 while the clock-event reason is active (gpu_idle is harmless)."),
        timeseries("Throttled time by reason", [
            target(f"rate(gpu_clock_throttle_seconds_total{{{s}}}[$__rate_interval])", "{{reason}}"),
        ], unit="percentunit", minimum=0, maximum=1, thr=thresholds((0.3, "orange")), w=24,
            description="Share of time the clocks were held down, per reason, from NVML's cumulative counters."),
        row("Thermals, power and activity"),
        timeseries("Temperature against thresholds", [
            target(f"gpu_temperature_celsius{{{s}}}", "core"),
            target(f"gpu_memory_temperature_celsius{{{s}}}", "memory (HBM)"),
            target(f'gpu_temperature_threshold_celsius{{{s}, threshold=~"slowdown|shutdown|memory_max"}}',
                   "{{threshold}} threshold"),
        ], unit="celsius", thr=TEMP_THRESHOLDS, w=8),
        timeseries("Power against limit", [
            target(f"gpu_power_usage_watts{{{s}}}", "draw"),
            target(f"gpu_power_limit_watts{{{s}}}", "limit"),
        ], unit="watt", minimum=0, thr=NO_THRESHOLDS, w=8),
        timeseries("Utilization", [
            target(f"gpu_utilization_ratio{{{s}}}", "SM"),
            target(f"gpu_memory_utilization_ratio{{{s}}}", "memory controller"),
        ], unit="percentunit", minimum=0, maximum=1, thr=thresholds((0.95, "orange")), w=8),
        row("Memory"),
        timeseries("Framebuffer memory", [
            target(f"gpu_memory_used_bytes{{{s}}}", "used"),
            target(f"gpu_memory_reserved_bytes{{{s}}}", "reserved by driver"),
            target(f"gpu_memory_total_bytes{{{s}}}", "total"),
        ], unit="bytes", minimum=0, thr=NO_THRESHOLDS, w=6),
        timeseries("Memory by process", [
            target(f"sum by (pid, process_type) (gpu_process_memory_used_bytes{{{s}}})",
                   "pid {{pid}} ({{process_type}})"),
        ], unit="bytes", minimum=0, stacked=True, thr=NO_THRESHOLDS, w=6),
        timeseries("Memory by container", [
            target('label_replace(sum by (container_name) (gpu_process_memory_used_bytes{' + s + '}),'
                   ' "container_name", "(no container)", "container_name", "")', "{{container_name}}"),
        ], unit="bytes", minimum=0, stacked=True, thr=NO_THRESHOLDS, w=6),
        timeseries("Memory by training job", [
            target('label_replace(sum by (training_job) (gpu_process_memory_used_bytes{' + s + '}),'
                   ' "training_job", "(not training)", "training_job", "")', "{{training_job}}"),
        ], unit="bytes", minimum=0, stacked=True, thr=NO_THRESHOLDS, w=6,
            links=[training_link("${__field.labels.training_job}")]),
        row("PCIe"),
        timeseries("PCIe throughput", [
            target(f"gpu_pcie_tx_bytes_per_second{{{s}}}", "tx"),
            target(f"gpu_pcie_rx_bytes_per_second{{{s}}}", "rx"),
        ], unit="Bps", minimum=0, thr=NO_THRESHOLDS, w=6),
        timeseries("PCIe link generation", [
            target(f"gpu_pcie_link_generation{{{s}}}", "now"),
            target(f"gpu_pcie_link_generation_max{{{s}}}", "max in this slot"),
            target(f"gpu_pcie_link_generation_device_max{{{s}}}", "card max"),
        ], unit="none", minimum=0, stepped=True, thr=NO_THRESHOLDS, w=6,
            description="Idle GPUs lower their generation to save power; below max while busy is a fault."),
        timeseries("PCIe link width", [
            target(f"gpu_pcie_link_width_lanes{{{s}}}", "now"),
            target(f"gpu_pcie_link_width_max_lanes{{{s}}}", "max"),
        ], unit="none", minimum=0, stepped=True, thr=NO_THRESHOLDS, w=6,
            description="Lanes; narrower than max is always a fault (riser, slot, cable)."),
        timeseries("PCIe replays and errors", [
            target(f"increase(gpu_pcie_replay_errors_total{{{s}}}[$__rate_interval])", "replays"),
            target(f"increase(gpu_pcie_errors_total{{{s}}}[$__rate_interval])", "{{error}}"),
        ], unit="none", minimum=0, thr=thresholds((1, "orange")), w=6,
            description="Link-level retransmissions and error counters; a steady stream means a bad riser, slot or cable."),
        row("NVLink"),
        timeseries("NVLink links up", [target(f"gpu_nvlink_up{{{s}}}", "link {{link}}")], unit="none",
                   minimum=0, maximum=1, stepped=True, thr=thresholds((1, "green"), base="red"), w=8,
                   description="1 per active link; a link at 0 while the others are up is a fault."),
        timeseries("NVLink errors", [
            target(f"sum by (link, error) (rate(gpu_nvlink_errors_total{{{s}}}[$__rate_interval]))",
                   "link {{link}} {{error}}"),
        ], unit="short", minimum=0, thr=thresholds((1, "orange")), w=8,
            description="CRC (flit, data), replay and recovery errors per second, per link."),
        timeseries("NVLink throughput", [
            target(f"sum(rate(gpu_nvlink_tx_bytes_total{{{s}}}[$__rate_interval]))", "tx, all links"),
            target(f"sum(rate(gpu_nvlink_rx_bytes_total{{{s}}}[$__rate_interval]))", "rx, all links"),
        ], unit="Bps", minimum=0, thr=NO_THRESHOLDS, w=8),
        row("ECC and XID history"),
        timeseries("ECC errors", [
            target(f"sum by (error_type, counter) (increase(gpu_ecc_errors_total{{{s}}}[$__rate_interval]))",
                   "{{error_type}} ({{counter}})"),
        ], unit="none", minimum=0, thr=ERROR_THRESHOLDS, w=8),
        timeseries("XID errors", [
            target(f"sum by (xid) {_new_or_increase('gpu_xid_errors_total', s)}", "xid {{xid}}"),
        ], unit="none", minimum=0, thr=ERROR_THRESHOLDS, w=8),
        timeseries("Remapped rows", [
            target(f"gpu_remapped_rows{{{s}}}", "{{kind}}"),
            target(f"gpu_remapped_rows_pending{{{s}}}", "pending"),
            target(f"gpu_remapped_rows_failure{{{s}}}", "failed"),
        ], unit="none", minimum=0, thr=ERROR_THRESHOLDS, w=8),
        table("XID last seen", [target(f"gpu_xid_last_seen_timestamp_seconds{{{s}}} * 1000", table=True)],
              unit="dateTimeAsIso", thr=NO_THRESHOLDS, hide=("Time", "__name__", "host", "gpu", "uuid")),
    ]
    variables = [
        query_var("host", "Host", "label_values(gpu_up, host)", multi=False, include_all=False),
        query_var("gpu", "GPU", 'label_values(gpu_up{host=~"$host"}, gpu)', multi=False, include_all=False),
    ]
    return dashboard(GPU_UID, "GPU detail", "One GPU over time.", variables, panels)


def training_job() -> Json:
    s = JOB_SEL
    step_time = (f"rate(training_step_duration_seconds_sum{{{s}}}[$__rate_interval])"
                 f" / rate(training_step_duration_seconds_count{{{s}}}[$__rate_interval])")
    job_gpus = f"gpu_process_memory_used_bytes{{{s}}}"
    panels = [
        row("Progress"),
        stat("Ranks reporting", [target(f"count(training_info{{{s}}})", "ranks")], unit="none",
             thr=thresholds(base="green")),
        stat("Steps per second", [target(f"avg(rate(training_steps_total{{{s}}}[$__rate_interval]))", "steps/s")],
             unit="none", thr=NO_THRESHOLDS, description="Average over ranks."),
        stat("Since last step", [target(f"time() - max(training_last_progress_timestamp_seconds{{{s}}})", "age")],
             unit="s", thr=thresholds((60, "orange"), (300, "red"))),
        stat("Step time spread", [target(f"max({step_time}) / min({step_time})", "slowest / fastest")],
             unit="none", thr=thresholds((1.2, "orange"), (1.5, "red")),
             description="Slowest rank's mean step time over the fastest's: a straggler shows here."),
        stat("CUDA OOMs (time range)", [
            target(f"sum(increase(training_cuda_oom_total{{{s}}}[$__range]))", "OOMs"),
        ], unit="none", thr=ERROR_THRESHOLDS),
        stat("Non-finite losses (time range)", [
            target(f"sum(increase(training_nonfinite_loss_total{{{s}}}[$__range]))", "NaN/Inf"),
        ], unit="none", thr=ERROR_THRESHOLDS),
        # issue 16: where each rank is now, and processes that ended abnormally
        table("Phase per rank", [
            target(f"time() - (training_phase_start_timestamp_seconds{{{s}}}"
                   f" * on (host, training_job, rank, pid) group_left (phase) (training_phase{{{s}}} == 1))",
                   table=True),
        ], unit="s", thr=thresholds((60, "orange"), (300, "red")), w=18, h=6,
            hide=("Time", "__name__", "instance", "job", "local_rank", "world_size", "training_job"),
            description="What each rank's training thread does now (data, compute, collective, checkpoint, "
                        "between_steps) and for how long: in a hang the culprit is the rank not in collective."),
        stat("Abnormal ends (still tracked)", [
            target(f'count(training_exit_timestamp_seconds{{{s}, reason!="normal"}}) or vector(0)', "ended"),
        ], unit="none", thr=ERROR_THRESHOLDS, w=6, h=6,
            description="Ranks that crashed, were signalled or vanished (training_exit_timestamp_seconds)."),
        row("Step time and throughput"),
        timeseries("Step time per rank", [target(step_time, "rank {{rank}}")], unit="s", minimum=0,
                   thr=NO_THRESHOLDS, description="Mean wall time per step; a straggler rank stands out."),
        timeseries("Compute and data wait per rank", [
            target(f"rate(training_compute_seconds_total{{{s}}}[$__rate_interval])", "compute rank {{rank}}"),
            target(f"rate(training_data_wait_seconds_total{{{s}}}[$__rate_interval])", "data wait rank {{rank}}"),
        ], unit="percentunit", minimum=0, thr=thresholds((0.2, "orange")),
            description="Share of wall time computing vs waiting for the next batch."),
        timeseries("Own work and waits per step, per rank", [
            target(f"(rate(training_step_duration_seconds_sum{{{s}}}[$__rate_interval])"
                   f" - rate(training_collective_wait_seconds_total{{{s}}}[$__rate_interval]))"
                   f" / rate(training_steps_total{{{s}}}[$__rate_interval])", "own work rank {{rank}}"),
            target(f"rate(training_collective_wait_seconds_total{{{s}}}[$__rate_interval])"
                   f" / rate(training_steps_total{{{s}}}[$__rate_interval])", "waiting for others rank {{rank}}"),
        ], unit="s", minimum=0, thr=NO_THRESHOLDS,
            description="Under synchronous DDP every rank's step takes as long as the slowest rank's; the "
                        "straggler is the rank with the most own work and the least waiting."),
        timeseries("Throughput", [
            target(f"sum(training_samples_per_second{{{s}}})", "samples/s (hook average)"),
            target(f"sum(rate(training_samples_total{{{s}}}[$__rate_interval]))", "samples/s"),
        ], unit="short", minimum=0, thr=NO_THRESHOLDS),
        timeseries("Loss", [target(f"training_loss{{{s}}}", "rank {{rank}}")], unit="none", thr=NO_THRESHOLDS),
        row("Memory"),
        timeseries("Allocator memory against card memory", [
            target(f"training_cuda_memory_allocated_bytes{{{s}}}", "allocated rank {{rank}}"),
            target(f"training_cuda_memory_reserved_bytes{{{s}}}", "reserved rank {{rank}}"),
            target(f"training_cuda_memory_max_allocated_bytes{{{s}}}", "peak allocated rank {{rank}}"),
            target(f"gpu_memory_total_bytes and on (host, gpu) {job_gpus}", "card {{host}} gpu {{gpu}}"),
        ], unit="bytes", minimum=0, thr=NO_THRESHOLDS, w=16,
            description="PyTorch caching allocator per rank against the memory of the cards the job runs on. "
                        "OOMs are marked as annotations."),
        timeseries("Allocator retries", [
            target(f"sum by (rank) (increase(training_cuda_alloc_retries_total{{{s}}}[$__rate_interval]))",
                   "rank {{rank}}"),
        ], unit="none", minimum=0, thr=thresholds((1, "orange")), w=8,
            description="Cache flush and retry: the allocator is close to running out."),
        table("At the last OOM: other holders of that GPU's memory", [
            target(f"training_oom_memory_holder_bytes{{{s}}}", table=True),
        ], unit="bytes", thr=NO_THRESHOLDS, w=24, h=6,
            hide=("Time", "__name__", "instance", "job", "local_rank", "world_size", "training_job"),
            description="Taken when the exporter learned of the rank's CUDA OOM (kept after the rank died): "
                        "who else filled the GPU."),
        row("Authentication"),
        timeseries("Auth failures", [
            target(f"sum by (service, status_code) {_new_or_increase('training_auth_failures_total', s)}",
                   "{{service}} {{status_code}}"),
        ], unit="none", minimum=0, thr=ERROR_THRESHOLDS),
        timeseries("Token time to expiry", [
            target(f"min by (service) (training_token_expiry_timestamp_seconds{{{s}}}) - time()", "{{service}}"),
        ], unit="s", thr=thresholds((300, "orange"), (3600, "green"), base="red")),
        row("GPUs"),
        table("GPUs the job runs on", [
            target(f"sum by (host, gpu, rank, pid) ({job_gpus})", table=True),
        ], unit="bytes", thr=NO_THRESHOLDS, links=[ROW_GPU_LINK], w=10,
            description="Value: GPU memory of the rank's process. Click a row for the GPU detail dashboard."),
        timeseries("Utilization of the job's GPUs", [
            target(f'gpu_utilization_ratio{{host=~"$host"}} and on (host, gpu) {job_gpus}', GPU_LEGEND),
        ], unit="percentunit", minimum=0, maximum=1, thr=thresholds((0.3, "green"), base="orange"), w=14,
            links=[SERIES_GPU_LINK]),
    ]
    variables = [
        query_var("training_job", "Training job", "label_values(training_info, training_job)",
                  multi=False, include_all=False),
        query_var("host", "Host", 'label_values(training_info{training_job=~"$training_job"}, host)',
                  multi=True, include_all=True),
        query_var("rank", "Rank", 'label_values(training_info{training_job=~"$training_job", host=~"$host"}, rank)',
                  multi=True, include_all=True),
    ]
    oom: Json = {
        "name": "CUDA OOM",
        "datasource": DATASOURCE,
        "enable": True,
        "hide": False,
        "iconColor": "red",
        # A process whose first push already carries its OOM is a new series: count it too.
        "expr": f"{_new_or_increase('training_cuda_oom_total', s)} > 0",
        "step": "$__rate_interval",
        "titleFormat": "CUDA out of memory",
        "tagKeys": "host,rank",
        "textFormat": "rank {{rank}} on {{host}}",
    }
    return dashboard(TRAINING_UID, "Training job", "One training job across its ranks.", variables, panels,
                     annotations=[oom])


# File name (in dashboards/) -> builder. The provisioning provider loads every *.json in the folder.
DASHBOARDS = {
    "fleet.json": fleet,
    "gpu-detail.json": gpu_detail,
    "training-job.json": training_job,
    "fleet-rollup.json": fleet_rollup,
}
