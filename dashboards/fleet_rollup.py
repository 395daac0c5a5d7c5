"""The Fleet roll-up dashboard: the fleet owner's view at hundreds to thousands of GPUs.

Built only on the recording rules of alerts/fleet.rules.yml (plus the host roll-ups of the shipped
rules), so every panel reads a few series per host, model or job, never one per GPU: counts and stats,
heatmaps of per-host distributions, state timelines and top-k tables point at the hosts to look at,
and the per-GPU dashboards (Fleet, GPU detail) take over from there. It needs the fleet rules loaded
(deploy/fleet/ does; a single Prometheus can load alerts/fleet.rules.yml too).
"""

from __future__ import annotations

from dashboards.grafana import (
    FLEET_ROLLUP_UID,
    Json,
    dashboard,
    heatmap,
    query_var,
    row,
    stat,
    state_timeline,
    table,
    target,
    thresholds,
    timeseries,
)

M = 'model=~"$model"'
NONE = thresholds()
BAD = thresholds((1, "red"))
# Hours in the picked range, for "GPU-hours" out of an average count over that range.
RANGE_HOURS = "$__range_s / 3600"
TOP = 10


def fleet_rollup() -> Json:
    gpus = f"sum(host_model:gpus:count{{{M}}})"
    panels = [
        row("The fleet now"),
        stat("GPUs", [target(gpus, "GPUs")], unit="none", thr=NONE, description="GPUs reporting, by model filter."),
        stat("GPUs down", [target(f"sum(host_model:gpus_down:sum{{{M}}})", "down")], unit="none", thr=BAD,
             description="GPUs the exporters know that failed their last NVML poll."),
        stat("GPUs idle", [target(f"sum(host_model:gpus_idle:sum{{{M}}})", "idle")], unit="none",
             thr=thresholds((1, "orange")), description="Answering GPUs under 5 % mean utilization over 5 min."),
        stat("Exporters down", [target("fleet:gpu_exporters_down:count", "down")], unit="none", thr=BAD,
             description="Nodes whose exporter does not answer scrapes: their GPUs are not counted at all."),
        stat("Fleet utilization", [
            target(f"sum(model:gpu_utilization:avg{{{M}}} * on (model) sum by (model) (host_model:gpus:count))"
                   f" / {gpus}", "utilization"),
        ], unit="percentunit", minimum=0, maximum=1, thr=thresholds((0.3, "green"), base="orange"),
            description="Mean SM utilization over the selected models, weighted by their GPU counts."),
        stat("Allocated-but-idle GPU-hours (range)", [
            target(f"sum(avg_over_time(host:gpus_allocated_idle:sum[$__range])) * {RANGE_HOURS}", "GPU-hours"),
        ], unit="h", thr=thresholds((1, "orange")),
            description="GPU-hours in the picked range during which a process held the GPU and it idled."),
        row("Distribution over time"),
        timeseries("GPUs by state", [
            target(f"sum(host_model:gpus_up:sum{{{M}}}) - sum(host_model:gpus_idle:sum{{{M}}})", "busy"),
            target(f"sum(host_model:gpus_idle:sum{{{M}}})", "idle"),
            target(f"sum(host_model:gpus_down:sum{{{M}}})", "down"),
        ], unit="none", minimum=0, thr=NONE, stacked=True, w=8,
            description="Every GPU is busy, idle or down; the stack is the fleet."),
        heatmap("Host utilization (distribution)", [target("host:gpu_utilization:avg", "{{host}}")],
                unit="percentunit", w=8,
                description="How many hosts sit at each mean GPU utilization, over time (one cell row per "
                            "10 % band): a fleet-wide drop shows as the mass moving down."),
        heatmap("Host max temperature (distribution)", [target("host:gpu_temperature_celsius:max", "{{host}}")],
                unit="celsius", w=8, description="Hottest GPU per host, distributed over hosts."),
        timeseries("Utilization by model", [target(f"model:gpu_utilization:avg{{{M}}}", "{{model}}")],
                   unit="percentunit", minimum=0, maximum=1, thr=NONE, w=12),
        timeseries("GPUs down by model", [
            target(f"sum by (model) (host_model:gpus_down:sum{{{M}}})", "{{model}}"),
        ], unit="none", minimum=0, thr=BAD, stepped=True, w=12),
        row("Where to look"),
        state_timeline(f"Top {TOP} hosts by GPUs down or idle", [
            target(f"topk({TOP}, 2 * (sum by (host) (host_model:gpus_down:sum{{{M}}}) > bool 0)"
                   f" + (sum by (host) (host_model:gpus_idle:sum{{{M}}}) > bool 0))", "{{host}}"),
        ], unit="none", thr=thresholds((1, "orange"), (2, "red")),
            description="The worst hosts over time: green every GPU busy, orange some idle, red some down. "
                        "The tables below count them now."),
        table(f"Top {TOP} hosts: GPUs down and idle", [
            target(f"topk({TOP}, sum by (host) (host_model:gpus_down:sum{{{M}}}))", table=True),
            target(f"topk({TOP}, sum by (host) (host_model:gpus_idle:sum{{{M}}}))", table=True),
        ], unit="none", thr=thresholds((1, "orange")), w=12,
            description="Value #A: GPUs down; Value #B: GPUs idle."),
        table(f"Top {TOP} hosts: allocated-but-idle GPU-hours (range)", [
            target(f"topk({TOP}, avg_over_time(host:gpus_allocated_idle:sum[$__range]) * {RANGE_HOURS})", table=True),
        ], unit="h", thr=thresholds((1, "orange")), w=12,
            description="Paid-for GPU time doing nothing; the Fleet dashboard's idle table names the holders."),
        row("Errors by model"),
        timeseries("XID errors per hour by model", [
            target(f"model_xid:gpu_xid_errors:increase1h{{{M}}}", "{{model}} xid {{xid}}"),
        ], unit="none", minimum=0, thr=BAD, w=12,
            description="XID events in the last hour, per model and code; divide by the GPU count for a rate per GPU."),
        timeseries("ECC errors per hour by model", [
            target(f"model_error_type:gpu_ecc_errors:increase1h{{{M}}}", "{{model}} {{error_type}}"),
        ], unit="none", minimum=0, thr=BAD, w=12),
        row("Training jobs (one per job, whatever nodes its ranks run on)"),
        state_timeline("Jobs training effectively", [
            target("training_job:training_effective:bool", "{{training_job}}"),
        ], unit="bool", thr=thresholds((1, "green"), base="red"), h=6,
            description="Green while every rank of the job completes steps; red when any rank stopped."),
        table("Jobs", [
            target("training_job:training_ranks:count", table=True),
            target("training_job:training_hosts:count", table=True),
            target("training_job:training_compute_seconds:ratio_rate5m", table=True),
            target("training_job:training_last_progress_age_seconds:max", table=True),
        ], unit="none", thr=NONE, w=12,
            description="Value #A ranks, #B nodes, #C share of rank time computing, #D seconds since the "
                        "job's slowest rank last stepped."),
        stat("Effective training job-hours (range)", [
            target(f"sum(avg_over_time(training_job:training_effective:bool[$__range])) * {RANGE_HOURS}", "job-hours"),
        ], unit="h", thr=NONE, w=12, h=8,
            description="Hours in the picked range that jobs spent with every rank stepping, summed over jobs."),
    ]
    variables = [
        query_var("model", "GPU model", "label_values(host_model:gpus:count, model)", multi=True, include_all=True),
    ]
    return dashboard(FLEET_ROLLUP_UID, "GPU fleet roll-up",
                     "Hundreds to thousands of GPUs, from the fleet recording rules.", variables, panels)
