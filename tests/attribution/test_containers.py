"""Container attribution without a Docker engine: cgroup layouts, the cache, the failure policy.

The real engine is exercised in tests/attribution/test_containers_docker.py; here the engine is a small fake so
every branch (not found, daemon gone, permission denied, recovery) is reached deterministically.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.attribution.containers import ContainerAttributor, build_attributor, container_id_from_cgroup
from exporter.attribution.docker import DockerEngine, DockerUnavailable, classify_error, engine_wanted
from exporter.snapshot import ContainerInfo, GpuProcess, GpuSample, NodeSnapshot
from harness.clock import FakeClock

CID = "e81a9168e2eadf77157f720771e3d115a1cb78649fb25f7222863219b01a1581"
OTHER = "0123456789abcdef" * 4
POD = "pod1a2b3c4d_5e6f_7a8b_9c0d_1e2f3a4b5c6d"

V1_DOCKER = "\n".join(
    f"{i}:{c}:/docker/{CID}"
    for i, c in enumerate(["cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids"], 1)
) + f"\n9:name=systemd:/docker/{CID}\n0::/docker/{CID}\n"

SAMPLES: dict[str, tuple[str, str | None]] = {
    "v1 docker cgroupfs (this CI machine)": (V1_DOCKER, CID),
    "v2 docker systemd driver": (f"0::/system.slice/docker-{CID}.scope\n", CID),
    "v2 docker container running systemd": (f"0::/system.slice/docker-{CID}.scope/init.scope\n", CID),
    "v2 private cgroup namespace": (f"0::/../docker-{CID}.scope\n", CID),
    "v2 kubepods systemd containerd": (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{POD}.slice/cri-containerd-{CID}.scope\n",
        CID,
    ),
    "v2 kubepods cri-o": (
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{POD}.slice/crio-{CID}.scope\n",
        CID,
    ),
    "v2 kubepods dockershim": (
        f"0::/kubepods.slice/kubepods-{POD}.slice/docker-{CID}.scope\n",
        CID,
    ),
    "v1 kubepods cgroupfs": (
        f"12:memory:/kubepods/burstable/pod1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d/{CID}\n"
        f"1:name=systemd:/kubepods/burstable/pod1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d/{CID}\n",
        CID,
    ),
    "v1 containerd systemd colon form": (
        f"1:name=systemd:/system.slice/containerd.service/kubepods-burstable-{POD}.slice:cri-containerd:{CID}\n",
        CID,
    ),
    "v1 containerd namespace (nerdctl)": (f"4:memory:/default/{CID}\n", CID),
    "v2 podman rootful": (f"0::/machine.slice/libpod-{CID}.scope\n", CID),
    "v2 podman rootless with inner cgroup": (
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container\n",
        CID,
    ),
    "v1 podman cgroupfs": (f"3:memory:/libpod_parent/libpod-{CID}\n", CID),
    "podman conmon is not the container": (f"0::/machine.slice/libpod-conmon-{CID}.scope\n", None),
    "docker in docker: the inner one": (f"0::/docker/{OTHER}/docker/{CID}\n", CID),
    "hybrid: id only on v1 lines": (f"0::/\n4:memory:/docker/{CID}\n1:name=systemd:/docker/{CID}\n", CID),
    "host process v2": ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
    "host process v1 root": ("4:memory:/\n1:name=systemd:/\n0::/\n", None),
    "32-hex sandbox name is not a container id": ("4:memory:/process_api/8f6d957d30ccad63fdcab0e2c32b125e\n", None),
    "systemd unit with hex-like name": ("0::/system.slice/docker.service\n", None),
    "empty file": ("", None),
    "garbage lines": ("not a cgroup line\n:::\n", None),
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_container_id_from_cgroup_layouts(name: str) -> None:
    text, expected = SAMPLES[name]
    assert container_id_from_cgroup(text) == expected


@given(
    cid=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    prefix=st.sampled_from(["/docker/", "/system.slice/docker-", "/kubepods/besteffort/podx/", "/cri-containerd-"]),
    suffix=st.sampled_from(["", ".scope"]),
    v2=st.booleans(),
)
def test_any_id_in_any_layout_is_found(cid: str, prefix: str, suffix: str, v2: bool) -> None:
    line = f"0::{prefix}{cid}{suffix}" if v2 else f"7:memory:{prefix}{cid}{suffix}"
    assert container_id_from_cgroup(line + "\n") == cid


class FakeEngine:
    """Answers like the Docker engine's inspect; ``down`` makes it fail like a missing socket."""

    base_url = "unix:///fake.sock"

    def __init__(self, docs: dict[str, dict[str, Any]]) -> None:
        self.docs = docs
        self.calls: list[str] = []
        self.pings = 0
        self.down: str | None = None

    def inspect(self, container_id: str) -> dict[str, Any] | None:
        self.calls.append(container_id)
        if self.down:
            raise DockerUnavailable(self.down, "connection refused")
        return self.docs.get(container_id)

    def ping(self) -> None:
        self.pings += 1
        if self.down:
            raise DockerUnavailable(self.down, "connection refused")


def inspect_doc(name: str, image: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"Id": "x", "Name": "/" + name, "Image": "sha256:abc", "Config": {"Image": image, "Labels": labels}}


def fake_proc(root: Path, pids: dict[int, str]) -> Path:
    for pid, text in pids.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cgroup").write_text(text)
    return root


def snapshot_with(*pids: int) -> NodeSnapshot:
    procs = tuple(GpuProcess(pid=p, process_type="compute", used_memory_bytes=1 << 30) for p in pids)
    return NodeSnapshot(
        host="h",
        timestamp_seconds=0.0,
        nvml_up=True,
        gpus=(GpuSample(index=0, uuid="GPU-0", processes=procs), GpuSample(index=1, uuid="GPU-1")),
    )


def containers(snap: NodeSnapshot) -> dict[int, ContainerInfo | None]:
    return {p.pid: p.container for g in snap.gpus for p in g.processes}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[ContainerAttributor, FakeEngine, FakeClock]:
    proc = fake_proc(
        tmp_path / "proc",
        {
            100: f"0::/system.slice/docker-{CID}.scope\n",
            101: f"0::/system.slice/docker-{CID}.scope\n",
            200: f"0::/kubepods.slice/kubepods-{POD}.slice/cri-containerd-{OTHER}.scope\n",
            300: "0::/user.slice/user-1000.slice/session-3.scope\n",
        },
    )
    engine = FakeEngine(
        {
            CID: inspect_doc(
                "train-7",
                "pytorch/pytorch:2.3",
                {
                    "com.docker.compose.project": "lab",
                    "com.docker.compose.service": "trainer",
                    "maintainer": "not selected",
                },
            )
        }
    )
    clock = FakeClock()
    att = ContainerAttributor(
        engine=engine, proc_root=proc, cache_ttl_seconds=60, negative_ttl_seconds=10, retry_seconds=5,
        health_seconds=30, clock=clock,
    )
    return att, engine, clock


def test_enricher_attributes_processes(setup: tuple[ContainerAttributor, FakeEngine, FakeClock]) -> None:
    att, engine, _ = setup
    out = containers(att(snapshot_with(100, 101, 200, 300, 999)))
    assert out[100] == ContainerInfo(
        id=CID,
        name="train-7",
        image="pytorch/pytorch:2.3",
        labels={"com.docker.compose.project": "lab", "com.docker.compose.service": "trainer"},
    )
    assert out[101] == out[100]
    # Known to the cgroup but not to the engine (a containerd pod): the id alone.
    assert out[200] == ContainerInfo(id=OTHER, name="", image="")
    assert out[300] is None  # a host process
    assert out[999] is None  # exited before we looked
    assert engine.calls == [CID, OTHER]  # one lookup per container, not per process
    assert att.stats().up is True


def test_cache_ttl_and_bound(setup: tuple[ContainerAttributor, FakeEngine, FakeClock]) -> None:
    att, engine, clock = setup
    att(snapshot_with(100, 200))
    att(snapshot_with(100, 200))
    assert engine.calls == [CID, OTHER]
    clock.now += 11  # negative entry (OTHER) expired, positive one not
    att(snapshot_with(100, 200))
    assert engine.calls == [CID, OTHER, OTHER]
    clock.now += 60
    att(snapshot_with(100))
    assert engine.calls[-1] == CID
    att.max_entries = 1
    att(snapshot_with(100, 200))
    assert att.stats().cache_entries == 1


def test_daemon_gone_then_back(
    setup: tuple[ContainerAttributor, FakeEngine, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    att, engine, clock = setup
    engine.down = "unavailable"
    with caplog.at_level(logging.WARNING, logger="exporter.attribution.containers"):
        for _ in range(5):
            out = containers(att(snapshot_with(100, 200)))
    # Never raises; keeps the id from the cgroup; says so once.
    assert out[100] == ContainerInfo(id=CID, name="", image="")
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    stats = att.stats()
    assert stats.up is False
    # The first ping failed; the rest of the calls waited for retry_seconds instead of hammering.
    assert stats.errors == {"unavailable": 1}
    assert engine.calls == []
    clock.now += 6
    att(snapshot_with(100))
    assert att.stats().errors == {"unavailable": 2}
    engine.down = None
    clock.now += 6
    out = containers(att(snapshot_with(100)))
    assert out[100] is not None and out[100].name == "train-7"
    assert att.stats().up is True


def test_stale_info_served_while_daemon_down(setup: tuple[ContainerAttributor, FakeEngine, FakeClock]) -> None:
    att, engine, clock = setup
    att(snapshot_with(100))
    engine.down = "unavailable"
    clock.now += 120  # entry expired; the lookup fails; what we knew beats a blank label
    out = containers(att(snapshot_with(100)))
    assert out[100] is not None and out[100].name == "train-7"
    assert att.stats().up is False


def test_health_ping_notices_a_dead_daemon_behind_cache_hits(
    setup: tuple[ContainerAttributor, FakeEngine, FakeClock],
) -> None:
    att, engine, clock = setup
    att(snapshot_with(100))
    engine.down = "permission"
    clock.now += 31  # cache still fresh (60 s) but the health ping is due (30 s)
    att(snapshot_with(100))
    assert att.stats().up is False
    assert att.stats().errors == {"permission": 1}


def test_unreadable_proc_logs_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proc = tmp_path / "proc"
    (proc / "100" / "cgroup").mkdir(parents=True)  # a directory: reading it is an OSError, not ENOENT
    att = ContainerAttributor(engine=FakeEngine({}), proc_root=proc)
    with caplog.at_level(logging.WARNING, logger="exporter.attribution.containers"):
        for _ in range(3):
            assert containers(att(snapshot_with(100)))[100] is None
    assert len([r for r in caplog.records if "host PID namespace" in r.getMessage()]) == 1


def test_snapshot_without_processes_is_returned_as_is(
    setup: tuple[ContainerAttributor, FakeEngine, FakeClock],
) -> None:
    att, _, _ = setup
    snap = snapshot_with()
    assert att(snap) is snap


def test_real_sdk_against_missing_socket(tmp_path: Path) -> None:
    engine = DockerEngine(f"unix://{tmp_path}/no-such.sock", timeout_seconds=1)
    with pytest.raises(DockerUnavailable) as err:
        engine.ping()
    assert err.value.kind == "unavailable", err.value


def test_classify_error() -> None:
    """Error kinds as the SDK chains them. Permission is shaped by hand: CI runs as root, where a
    socket's permission bits do not apply, so a non-root exporter's EACCES cannot be provoked here."""
    err = PermissionError(13, "Permission denied")
    wrapped = ConnectionError("('Connection aborted.', PermissionError(13, 'Permission denied'))")
    wrapped.__cause__ = err
    assert classify_error(wrapped) == "permission"
    assert classify_error(TimeoutError("timed out")) == "timeout"
    assert classify_error(ConnectionRefusedError(111, "Connection refused")) == "unavailable"
    assert classify_error(ValueError("odd")) == "unknown"


def test_engine_wanted_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    path = tmp_path / "d.sock"
    assert engine_wanted("off", f"unix://{path}") is False
    assert engine_wanted("on", f"unix://{path}") is True
    assert engine_wanted("auto", f"unix://{path}") is False  # no socket: quietly off
    path.mkdir()  # what a hostPath mount of a missing socket looks like
    assert engine_wanted("auto", f"unix://{path}") is False
    path.rmdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    try:
        assert engine_wanted("auto", f"unix://{path}") is True
        assert engine_wanted("auto", f"unix://{path}", importable=("no_such_module_xyz",)) is False
    finally:
        sock.close()
    assert engine_wanted("auto", "tcp://10.0.0.1:2375") is True
    with pytest.raises(ValueError, match="auto, on, off"):
        engine_wanted("sometimes", None)


def test_build_attributor_without_engine_gives_ids(tmp_path: Path) -> None:
    assert build_attributor("off") is None
    att = build_attributor("auto", f"unix://{tmp_path}/none.sock", proc_root=str(fake_proc(
        tmp_path / "proc", {100: f"0::/kubepods.slice/cri-containerd-{CID}.scope\n"}
    )))
    assert att is not None and att.engine is None
    assert containers(att(snapshot_with(100)))[100] == ContainerInfo(id=CID, name="", image="")
    assert att.stats().up is None  # never asked: no docker_up series
