"""Sample multi-task vision training job, instrumented with the GPU exporter's training hook.

A shared convolutional backbone feeds a classification head and a multi-label attribute head (AMP
on CUDA), trained on synthetic images, on CPU or CUDA, optionally across ranks with
torch.distributed (gloo on CPU). Faults can be injected on request so the end-to-end alert tests
can produce every training-side failure the exporter must see.

Faults (--fault, repeatable; STEP counts from 1 on every rank):
  oom@STEP            CUDA out of memory inside step STEP, caught by the training loop (training
                      goes on). CUDA: a real over-allocation; CPU: a genuine torch.OutOfMemoryError
                      raised inside the step.
  stall@STEP:SECONDS[:RANK]  no progress for SECONDS before step STEP (a hung input pipeline), on
                      every rank or only on RANK (under DDP the others then wait in the all-reduce).
  slow-rank@RANK:FACTOR  rank RANK's input pipeline is FACTOR times slower than its step: its data
                      wait grows (and under DDP the other ranks' compute, waiting in all-reduce).
  slow-compute@RANK:FACTOR  rank RANK's own compute takes about FACTOR times as long (it sleeps inside
                      the step, before backward): under DDP the other ranks wait for it in the all-reduce.
  crash@STEP          step STEP raises RuntimeError, uncaught: the process ends with a traceback.
  nan@STEP[:COUNT]    the loss is NaN from step STEP on (for COUNT steps; default: to the end);
                      the optimizer step is skipped, as AMP's GradScaler does.
  auth@SECONDS        batches come over HTTP from workload.token_server with a bearer token that
                      expires after SECONDS; from then on every fetch gets 401 "Authentication
                      failed" (recorded by the hook) and the step uses a local batch.

A simulated GPU (--sim-gpu INDEX, with an exporter running --simulate at --exporter-url): each step
the job asks the exporter's simulated device for its memory (--sim-memory held, plus --sim-transient
during the step, growing by --sim-grow per step up to --sim-memory-max); when the device has no room
the step raises a genuine torch.OutOfMemoryError with CUDA's message. --exit-on-oom lets it end the
process instead of being caught.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("workload.train")

NUM_CLASSES = 10
NUM_ATTRIBUTES = 5


class MultiTaskNet(nn.Module):
    """Shared conv backbone with a class head and an attribute head (multi-label)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.cls_head = nn.Linear(width * 2, NUM_CLASSES)
        self.attr_head = nn.Linear(width * 2, NUM_ATTRIBUTES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return self.cls_head(features), self.attr_head(features)


@dataclass
class Faults:
    oom_steps: set[int] = field(default_factory=set)
    stalls: dict[int, float] = field(default_factory=dict)
    slow_ranks: dict[int, float] = field(default_factory=dict)
    slow_compute: dict[int, float] = field(default_factory=dict)
    stall_ranks: dict[int, int] = field(default_factory=dict)  # step -> the only rank that stalls
    crash_step: int | None = None
    nan_from: int | None = None
    nan_count: int | None = None
    auth_ttl: float | None = None

    def nan_at(self, step: int) -> bool:
        if self.nan_from is None or step < self.nan_from:
            return False
        return self.nan_count is None or step < self.nan_from + self.nan_count


def parse_faults(specs: list[str]) -> Faults:
    """Parse ``--fault`` values; raises ValueError naming the bad one."""
    faults = Faults()
    for spec in specs:
        kind, _, arg = spec.partition("@")
        try:
            if kind == "oom":
                faults.oom_steps.add(int(arg))
            elif kind == "stall":
                step, seconds, *only = arg.split(":")
                faults.stalls[int(step)] = float(seconds)
                if only:
                    (rank,) = only
                    faults.stall_ranks[int(step)] = int(rank)
            elif kind == "slow-compute":
                rank, factor = arg.split(":")
                faults.slow_compute[int(rank)] = float(factor)
            elif kind == "crash":
                faults.crash_step = int(arg)
            elif kind == "slow-rank":
                rank, factor = arg.split(":")
                faults.slow_ranks[int(rank)] = float(factor)
            elif kind == "nan":
                step, _, count = arg.partition(":")
                faults.nan_from = int(step)
                faults.nan_count = int(count) if count else None
            elif kind == "auth":
                faults.auth_ttl = float(arg)
            else:
                raise ValueError(f"unknown fault kind {kind!r}")
        except ValueError as exc:
            raise ValueError(f"bad --fault {spec!r}: {exc} (see --help)") from exc
    return faults


class HttpBatches:
    """Fetches batch seeds from the token server with a bearer token; records auth health."""

    def __init__(self, url: str, token: str, mon: Any) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.mon = mon
        self.failures = 0
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        if mon is not None:
            mon.set_token("dataset", token)  # JWT exp -> training_token_expiry_timestamp_seconds

    def fetch(self, step: int) -> int | None:
        """The seed of batch ``step``, or None when the server refused (the caller uses a local batch)."""
        req = urllib.request.Request(
            f"{self.url}/batch?seed={step}", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with self._opener.open(req, timeout=5) as resp:
                body = json.loads(resp.read())
                self._quota(resp.headers)
                return int(body["seed"])
        except urllib.error.HTTPError as err:
            self._quota(err.headers)
            if self.mon is not None:
                self.mon.record_exception("dataset", err)  # 401/403 -> training_auth_failures_total
            if self.failures == 0:
                log.error("dataset fetch failed: %s %s", err.code, err.read().decode(errors="replace"))
            self.failures += 1
            return None
        except OSError as exc:
            if self.failures == 0:
                log.error("dataset server unreachable: %s", exc)
            self.failures += 1
            return None

    def _quota(self, headers: Any) -> None:
        if self.mon is None or headers is None:
            return
        remaining, limit = headers.get("X-RateLimit-Remaining"), headers.get("X-RateLimit-Limit")
        if remaining is not None:
            self.mon.set_api_quota("dataset", float(remaining), float(limit) if limit else None)


def synthetic_batch(seed: int, batch_size: int, image_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    classes = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    attributes = (torch.rand(batch_size, NUM_ATTRIBUTES, generator=g) > 0.5).float()
    return images.to(device), classes.to(device), attributes.to(device)


def inject_oom(device: torch.device, step: int) -> None:
    """Raise a genuine torch.OutOfMemoryError inside the step."""
    if device.type == "cuda":
        _free, total = torch.cuda.mem_get_info(device)
        torch.empty(int(total * 2), dtype=torch.uint8, device=device)  # really over-allocates
    raise torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB "
        f"of which 1.50 GiB is free. (injected on CPU by workload.train --fault oom@{step})"
    )


_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "B": 1}


def parse_bytes(text: str) -> int:
    """``8GiB``, ``512MiB`` or a plain number of bytes."""
    for unit, factor in _UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


class SimulatedGpuMemory:
    """This process's memory on one of the exporter's simulated GPUs (POST /-/simulate/events
    ``allocate``): the device, not this class, decides whether an allocation fits, so two jobs sharing
    a simulated GPU really compete for it."""

    def __init__(self, url: str, index: int, held: int, transient: int, grow: int, cap: int | None) -> None:
        self.url = url.rstrip("/") + "/-/simulate/events"
        self.index = index
        self.held = held
        self.transient = transient
        self.grow = grow
        self.cap = cap
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._allocate(held, held)

    def _allocate(self, total: int, requested: int) -> None:
        body = {"gpu": self.index, "allocate": {"pid": os.getpid(), "type": "compute", "used_memory_bytes": total}}
        req = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with self._opener.open(req, timeout=10) as resp:
                resp.read()
        except urllib.error.HTTPError as err:
            if err.code != 409:
                raise
            info = json.loads(err.read() or b"{}")
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {_gib(requested)}. GPU {self.index} has a total capacity "
                f"of {_gib(info.get('total_bytes', 0))} of which {_gib(info.get('free_bytes', 0))} is free. "
                f"Process {os.getpid()} has {_gib(self.held)} memory in use. (simulated device)"
            ) from None

    def step(self) -> None:
        """Inside a step: grow the held memory, then take (and give back) the step's transient memory."""
        if self.grow and (self.cap is None or self.held < self.cap):
            target = self.held + self.grow if self.cap is None else min(self.held + self.grow, self.cap)
            self._allocate(target, target - self.held)
            self.held = target
        if self.transient:
            self._allocate(self.held + self.transient, self.transient)
            self._allocate(self.held, 0)


@dataclass
class Result:
    steps: int = 0
    ooms_caught: int = 0
    nonfinite: int = 0
    auth_failures: int = 0
    seconds: float = 0.0
    rank: int = 0
    pid: int = 0


def train(args: argparse.Namespace, rank: int, world_size: int) -> Result:
    """The training loop of one rank."""
    faults = parse_faults(args.fault)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{rank % max(1, torch.cuda.device_count())}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(1234 + rank)

    mon = None
    if not args.no_hook:
        import exporter.hook as gpu_hook

        mon = gpu_hook.start(
            job=args.job,
            url=args.exporter_url,
            interval=args.push_interval,
            rank=rank,
            local_rank=rank,
            world_size=world_size,
            loss_every=args.loss_every,
        )

    model: nn.Module = MultiTaskNet(args.width).to(device)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model)
        if mon is not None:
            mon.watch_ddp(model)  # times the all-reduce apart from this rank's own work
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda)

    batches: HttpBatches | None = None
    server = None
    if args.data_url or faults.auth_ttl is not None:
        token = args.token
        if args.data_url is None:
            from workload.token_server import TokenServer

            server = TokenServer(quota=args.quota).start()
            token = server.issue(faults.auth_ttl if faults.auth_ttl is not None else 3600.0)
            url = server.url
        else:
            url = args.data_url
            if args.token_file:
                with open(args.token_file, encoding="utf-8") as fh:
                    token = fh.read().strip()
        batches = HttpBatches(url, token or "", mon)

    stop = {"flag": False}

    def on_term(signum: int, frame: Any) -> None:
        stop["flag"] = True

    with contextlib.suppress(ValueError):  # not the main thread (embedded use)
        signal.signal(signal.SIGTERM, on_term)

    sim_gpu = None
    if args.sim_gpu is not None:
        sim_gpu = SimulatedGpuMemory(
            args.exporter_url or os.environ.get("GPU_EXPORTER_URL") or "http://127.0.0.1:9835",
            args.sim_gpu, parse_bytes(args.sim_memory), parse_bytes(args.sim_transient),
            parse_bytes(args.sim_grow), parse_bytes(args.sim_memory_max) if args.sim_memory_max else None,
        )  # fmt: skip
    result = Result(rank=rank, pid=os.getpid())
    slow_compute = faults.slow_compute.get(rank)
    slow = faults.slow_ranks.get(rank)
    start = time.perf_counter()
    deadline = start + args.duration if args.duration else math.inf
    step = 0
    last_compute = 0.0
    while not stop["flag"] and (args.steps <= 0 or step < args.steps) and time.perf_counter() < deadline:
        step += 1
        try:
            with mon.step(samples=args.batch_size) if mon is not None else contextlib.nullcontext():
                # --- input pipeline (data wait)
                t_own = time.perf_counter()
                if step in faults.stalls and faults.stall_ranks.get(step, rank) == rank:
                    log.warning("fault: stalling %.1fs before step %d", faults.stalls[step], step)
                    time.sleep(faults.stalls[step])
                seed = step * world_size + rank
                if batches is not None:
                    fetched = batches.fetch(seed)
                    seed = fetched if fetched is not None else seed
                images, classes, attributes = synthetic_batch(seed, args.batch_size, args.image_size, device)
                if slow:
                    time.sleep(max(last_compute, 0.001) * (slow - 1.0))
                if args.step_delay:
                    time.sleep(args.step_delay)
                if mon is not None:
                    mon.data_ready()
                # --- compute
                t0 = time.perf_counter()
                if step in faults.oom_steps:
                    inject_oom(device, step)
                if step == faults.crash_step:
                    raise RuntimeError(f"injected crash in step {step} (workload.train --fault crash@{step})")
                if sim_gpu is not None:
                    sim_gpu.step()
                with torch.autocast(device.type, enabled=use_cuda):
                    logits, attr_logits = model(images)
                    loss = F.cross_entropy(logits, classes) + F.binary_cross_entropy_with_logits(
                        attr_logits.float(), attributes
                    )
                if slow_compute:  # own work FACTOR times as long: sleep (FACTOR-1) x this step's own time so far
                    time.sleep((slow_compute - 1.0) * max(time.perf_counter() - t_own, 0.001))
                if faults.nan_at(step):
                    loss = loss * float("nan")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if device.type == "cpu" and not torch.isfinite(loss):
                    result.nonfinite += 1  # skip the update, as GradScaler does on CUDA
                else:
                    scaler.step(optimizer)
                scaler.update()
                last_compute = time.perf_counter() - t0
        except torch.OutOfMemoryError as exc:
            if args.exit_on_oom:
                raise
            # What real jobs do: free what they can, log, skip the batch. The hook counted it anyway.
            result.ooms_caught += 1
            log.error("step %d: %s; skipping the batch", step, str(exc).splitlines()[0])
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if mon is not None:
            mon.observe_loss(loss)
        result.steps += 1
        if args.log_every and step % args.log_every == 0:
            log.info("rank %d step %d loss %.4f", rank, step, float(loss.detach()))
    result.seconds = time.perf_counter() - start
    result.auth_failures = batches.failures if batches is not None else 0
    if mon is not None:
        import exporter.hook as gpu_hook

        gpu_hook.stop(flush=True)
    if server is not None:
        server.stop()
    return result


def _run_rank(rank: int, args: argparse.Namespace, world_size: int, port: int) -> None:
    """Entry point of one spawned DDP rank (gloo on CPU, nccl on CUDA)."""
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
        }
    )
    _setup_logging(args)
    _run_distributed(args, rank, world_size)


def _run_distributed(args: argparse.Namespace, rank: int, world_size: int) -> None:
    import torch.distributed as dist

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    try:
        _report(train(args, rank, world_size))
    finally:
        dist.destroy_process_group()


def _report(result: Result) -> None:
    """One write(2) per line: DDP ranks share stdout, and print()'s separate newline write interleaves."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (json.dumps({"result": result.__dict__}) + "\n").encode())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _setup_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s pid={os.getpid()} %(name)s %(levelname)s %(message)s",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m workload.train",
        description=(__doc__ or "").split("\n\n")[0],
        epilog=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per rank; 0 = until --duration or SIGTERM")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = no limit)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--width", type=int, default=16, help="backbone width (channels)")
    p.add_argument("--step-delay", type=float, default=0.0, help="extra seconds of input time per step (slows the job down)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--ddp", type=int, default=0, metavar="N", help="spawn N ranks with torch.distributed (gloo on CPU)")
    p.add_argument("--job", default=os.environ.get("GPU_EXPORTER_JOB", "sample-multitask"), help="training_job label")
    p.add_argument("--exporter-url", default=None, help="exporter base URL (default: GPU_EXPORTER_URL or http://127.0.0.1:9835)")
    p.add_argument("--push-interval", type=float, default=None, help="hook push period, seconds (default 1)")
    p.add_argument("--loss-every", type=int, default=10, help="sample a CUDA loss every N steps (CPU: every step)")
    p.add_argument("--no-hook", action="store_true", help="run without the training hook (baseline)")
    p.add_argument("--fault", action="append", default=[], metavar="KIND@ARGS", help="inject a fault (repeatable; see below)")
    p.add_argument("--data-url", default=None, help="fetch batches from this workload.token_server")
    p.add_argument("--token", default=None, help="bearer token for --data-url")
    p.add_argument("--token-file", default=None, help="file holding the bearer token for --data-url")
    p.add_argument("--quota", type=int, default=None, help="request quota of the in-process token server (auth fault)")
    p.add_argument("--sim-gpu", type=int, default=None, metavar="INDEX", help="take memory on this simulated GPU of the exporter (--simulate)")
    p.add_argument("--sim-memory", default="1GiB", help="memory held on the simulated GPU")
    p.add_argument("--sim-transient", default="0", help="extra memory each step takes and gives back")
    p.add_argument("--sim-grow", default="0", help="held memory grows by this much per step")
    p.add_argument("--sim-memory-max", default=None, help="held memory stops growing here")
    p.add_argument("--exit-on-oom", action="store_true", help="an OOM ends the process (uncaught) instead of skipping the batch")
    p.add_argument("--log-every", type=int, default=50, help="log the loss every N steps (0 = never)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_faults(args.fault)
    except ValueError as exc:
        parser.error(str(exc))
    _setup_logging(args)
    env_world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if args.ddp > 1:
        import torch.multiprocessing as mp

        mp.spawn(_run_rank, args=(args, args.ddp, _free_port()), nprocs=args.ddp, join=True)
    elif env_world > 1:  # launched by torchrun
        _run_distributed(args, int(os.environ.get("RANK", "0")), env_world)
    else:
        _report(train(args, 0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
