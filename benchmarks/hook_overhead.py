"""Host overhead of the training hook: µs per step, step-time ratio, and (``--cuda``) device syncs.

Three measurements, each with and without the hook in the same process, alternating blocks so drift
(other work on the machine, CPU frequency) hits both sides alike; figures are medians:

1. micro: a tiny step (one in-place add on a small tensor) repeated many times, so the hook's own
   cost (``with mon.step(samples=...)`` + ``mon.observe_loss(...)``) is visible. The sender thread runs
   and pushes to a loopback receiver meanwhile, as in a real job.
2. workload: the sample workload's training step (``workload.train``: model, synthetic batch, losses,
   CPU), each step timed, blocks alternating with and without the hook; step-time ratio = median
   seconds per step with / without.
3. ddp (issue 16): ``mon.watch_ddp`` (comm hook around the all-reduce + forward pre-hooks around the
   buffer broadcast) on a 1-rank gloo DDP model of 4 parameter buckets: µs per step with the watched
   and an identical unwatched DDP model, alternating blocks (DDP accepts one comm hook and none can
   be removed, hence two models).
4. ``--cuda``: the micro loop on the GPU with a CUDA loss tensor under
   ``torch.cuda.set_sync_debug_mode("error")``, plus the sender's payload build (allocator stats, OOM
   observer) on the training thread: any synchronising call the hook makes raises and fails the run.

    python -m benchmarks.hook_overhead [--blocks 60 --block-steps 2000 --workload-rounds 20 --workload-steps 150] [--cuda]

Prints figures; exits 1 only when ``--cuda`` caught a synchronisation (or CUDA is missing).
Targets (issue 3): <= 10 µs per step, <= 0.5 % step time, zero syncs.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import threading
import time
import timeit
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

import exporter.hook as gpu_hook

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Sink(BaseHTTPRequestHandler):
    """Accepts the hook's pushes (202) and discards them: a stand-in for the exporter."""

    pushes = 0  # counted from the server's threads; read for the report only

    def do_POST(self) -> None:
        _Sink.pushes += 1
        self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_sink() -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="sink", daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def micro(blocks: int, block_steps: int, url: str, device: str, push_interval: float) -> dict[str, float]:
    """Median µs per tiny step without / with the hook (alternating blocks in one process)."""
    x = torch.zeros(16, device=device)
    loss = x.sum()  # a 0-d tensor, as a loop passes it: on CPU the hook reads it every step
    mon = gpu_hook.start(job="hook-overhead", url=url, interval=push_interval, loss_every=10)
    pushes_before = _Sink.pushes

    def plain() -> None:
        for _ in range(block_steps):
            x.add_(1.0)

    def hooked() -> None:
        step = mon.step
        observe = mon.observe_loss
        for _ in range(block_steps):
            with step(samples=8):
                x.add_(1.0)
            observe(loss)

    runs: dict[str, list[float]] = {"without": [], "with": []}
    pairs: list[float] = []
    for i in range(blocks + 2):
        order: list[tuple[str, Callable[[], None]]] = [("without", plain), ("with", hooked)]
        if i % 2:
            order.reverse()
        per: dict[str, float] = {}
        for name, body in order:
            t0 = time.perf_counter()
            body()
            if device == "cuda":
                torch.cuda.synchronize()  # outside the hook; both sides pay it alike
            per[name] = (time.perf_counter() - t0) / block_steps * 1e6
        if i >= 2:  # the first pairs warm up caches and the allocator
            for name in runs:
                runs[name].append(per[name])
            pairs.append(per["with"] - per["without"])
    steps_recorded = mon.steps

    def empty_step() -> None:
        with mon.step(samples=8):
            pass

    calls = {  # best of 5 repeats: the cost of each call itself, with contention filtered out
        name: min(timeit.repeat(fn, number=20000, repeat=5)) / 20000 * 1e6
        for name, fn in (
            ("step_context_us", empty_step),
            ("observe_loss_tensor_us", lambda: mon.observe_loss(loss)),
            ("observe_loss_float_us", lambda: mon.observe_loss(0.5)),
        )
    }
    gpu_hook.stop(flush=True)
    return {
        **calls,
        "without_us": statistics.median(runs["without"]),
        "with_us": statistics.median(runs["with"]),
        "overhead_us": statistics.median(pairs),
        "overhead_p90_us": statistics.quantiles(pairs, n=10)[-1] if len(pairs) >= 10 else max(pairs),
        "steps_recorded": float(steps_recorded),
        "pushes": float(_Sink.pushes - pushes_before),
    }


def workload(rounds: int, block_steps: int, url: str, push_interval: float) -> dict[str, float]:
    """Median seconds per step of the sample workload's step (CPU) without / with the hook.

    The step is workload.train's: synthetic batch, multi-task forward, two losses, backward, SGD. Each
    step is timed on its own and blocks of steps alternate between plain and hooked, so the medians
    over thousands of steps shrug off the preemptions of a shared machine.
    """
    from workload.train import MultiTaskNet, synthetic_batch

    device = torch.device("cpu")
    model = MultiTaskNet(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = gpu_hook.start(job="hook-overhead-workload", url=url, interval=push_interval)
    times: dict[str, list[float]] = {"without": [], "with": []}
    block_ratios: list[float] = []
    perf = time.perf_counter

    def step(seed: int) -> torch.Tensor:
        images, classes, attributes = synthetic_batch(seed, 8, 16, device)
        logits, attr_logits = model(images)
        loss = F.cross_entropy(logits, classes) + F.binary_cross_entropy_with_logits(attr_logits, attributes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def plain(n: int, seed: int) -> list[float]:
        out = []
        loss = None  # kept alive until the next step, as in the hooked loop (and in real loops)
        for i in range(n):
            t0 = perf()
            loss = step(seed + i)
            out.append(perf() - t0)
        del loss
        return out

    def hooked(n: int, seed: int) -> list[float]:
        out = []
        for i in range(n):
            t0 = perf()
            with mon.step(samples=8):
                loss = step(seed + i)
            mon.observe_loss(loss)
            out.append(perf() - t0)
        return out

    plain(50, 0)  # warm-up
    for r in range(rounds):
        order = [("without", plain), ("with", hooked)]
        if r % 2:
            order.reverse()
        medians: dict[str, float] = {}
        for name, body in order:
            got = body(block_steps, r * block_steps)
            times[name] += got
            medians[name] = statistics.median(got)
        block_ratios.append(medians["with"] / medians["without"])
    gpu_hook.stop(flush=True)
    return {
        "without_ms": statistics.median(times["without"]) * 1e3,
        "with_ms": statistics.median(times["with"]) * 1e3,
        "ratio": statistics.median(times["with"]) / statistics.median(times["without"]),
        "ratio_blocks": statistics.median(block_ratios),
        "ratio_min": min(block_ratios),
        "ratio_max": max(block_ratios),
        "steps": float(len(times["with"])),
    }


def cuda_sync_check(steps: int, url: str) -> str | None:
    """Run the hooked loop on CUDA under sync debug mode "error"; None if no sync, else the error."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    x = torch.zeros(1 << 20, device="cuda")
    mon = gpu_hook.start(job="hook-sync-check", url=url, interval=0.05, loss_every=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(steps):
            with mon.step(samples=8):
                x.mul_(1.0001)
                loss = x.mean()
            mon.observe_loss(loss)  # CUDA tensor: async copy + event, never .item() on the device
            if i % 50 == 0:
                mon.build_payload()  # what the sender does, here on the training thread under "error"
    except RuntimeError as exc:
        return f"synchronising call on the training thread: {exc}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    payload = mon.build_payload()
    gpu_hook.stop(flush=True)
    if mon.loss is None:
        return "the hook never read the CUDA loss (async sampler produced nothing)"
    print(
        f"cuda: {steps} hooked steps under set_sync_debug_mode('error'): no synchronisation; "
        f"loss sampled {mon.loss:.6g}; allocator stats pushed: "
        f"{sorted(k for k in payload['gauges'] if k.startswith('cuda_memory'))}"
    )
    return None


def ddp_watch(blocks: int, block_steps: int, url: str, push_interval: float) -> dict[str, float]:
    """Median µs per DDP step (1 rank, gloo) without / with ``mon.watch_ddp`` (both inside ``mon.step``)."""
    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    mon = gpu_hook.start(job="hook-overhead-ddp", url=url, interval=push_interval)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)], torch.nn.BatchNorm1d(64))
        # bucket_cap_mb tiny: one bucket per layer, so the per-bucket callback cost is counted 4-5 times
        return torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=0.01)

    plain_model, watched_model = model(), model()
    assert mon.watch_ddp(watched_model)
    x = torch.randn(8, 64)

    def run(net: torch.nn.Module) -> None:
        for _ in range(block_steps):
            with mon.step(samples=8):
                net(x).sum().backward()

    runs: dict[str, list[float]] = {"without": [], "with": []}
    pairs: list[float] = []
    for i in range(blocks + 2):
        order = [("without", plain_model), ("with", watched_model)]
        if i % 2:
            order.reverse()
        per: dict[str, float] = {}
        for name, net in order:
            t0 = time.perf_counter()
            run(net)
            per[name] = (time.perf_counter() - t0) / block_steps * 1e6
        if i >= 2:
            for name in runs:
                runs[name].append(per[name])
            pairs.append(per["with"] - per["without"])
    waited = mon.collective_wait_seconds
    gpu_hook.stop(flush=True)
    if own_group:
        dist.destroy_process_group()
    return {
        "without_us": statistics.median(runs["without"]),
        "with_us": statistics.median(runs["with"]),
        "overhead_us": statistics.median(pairs),
        "collective_wait_s": waited,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=60, help="alternating micro blocks per side")
    p.add_argument("--block-steps", type=int, default=2000, help="tiny steps per micro block")
    p.add_argument("--workload-rounds", type=int, default=20, help="alternating workload blocks per side")
    p.add_argument("--workload-steps", type=int, default=150, help="workload steps per block")
    p.add_argument("--push-interval", type=float, default=1.0, help="hook push period (the default is 1 s)")
    p.add_argument("--cuda", action="store_true", help="also run the micro loop on CUDA and check for syncs")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier figures)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    server, url = start_sink()

    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, push interval {args.push_interval}s")
    m = micro(args.blocks, args.block_steps, url, "cpu", args.push_interval)
    print(
        f"micro (CPU, {args.blocks} blocks x {args.block_steps} steps per side): "
        f"without {m['without_us']:.2f} µs/step, with hook {m['with_us']:.2f} µs/step, "
        f"overhead median {m['overhead_us']:.2f} µs/step (p90 of blocks {m['overhead_p90_us']:.2f}); "
        f"{int(m['steps_recorded'])} steps recorded, {int(m['pushes'])} pushes delivered"
    )
    print(
        f"per call (best of 5): `with mon.step()` {m['step_context_us']:.2f} µs, "
        f"observe_loss(CPU tensor) {m['observe_loss_tensor_us']:.2f} µs, observe_loss(float) "
        f"{m['observe_loss_float_us']:.2f} µs"
    )
    w = workload(args.workload_rounds, args.workload_steps, url, args.push_interval)
    print(
        f"workload step (sample multi-task model, CPU, {int(w['steps'])} steps per side in "
        f"{args.workload_rounds} alternating blocks): without {w['without_ms']:.3f} ms/step, "
        f"with hook {w['with_ms']:.3f} ms/step; step-time ratio {w['ratio']:.4f} "
        f"(median of block ratios {w['ratio_blocks']:.4f}, blocks {w['ratio_min']:.4f}..{w['ratio_max']:.4f}); "
        f"micro overhead / step time = {m['overhead_us'] / (w['without_ms'] * 1e3) * 100:.3f} %"
    )
    d = ddp_watch(max(6, args.blocks // 3), max(50, args.block_steps // 20), url, args.push_interval)
    print(
        f"ddp (1 rank, gloo, 5 buckets): without watch_ddp {d['without_us']:.1f} µs/step, with "
        f"{d['with_us']:.1f} µs/step, overhead median {d['overhead_us']:.2f} µs/step "
        f"(collective wait recorded: {d['collective_wait_s']:.4f} s)"
    )
    status = 0
    if args.cuda:
        error = cuda_sync_check(2000, url)
        if error is not None:
            print(f"cuda: FAILED: {error}")
            status = 1
    server.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
