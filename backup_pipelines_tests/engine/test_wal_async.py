"""Asynchronous archiving (``pitr.async_archive``): the same contract with PostgreSQL as the
synchronous commands, through real processes, on real WAL segments from a real cluster.

wal-push exits 0 only once the segment is stored in every place; a worker killed mid-push or a
full spool never turns into a reported success; recovery through the prefetching worker gives
exactly the rows at the target time. No worker outlives its test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port, init_cluster
from backup_pipelines.engine.wal import object_stem
from backup_pipelines.engine.wal import spool as spool_protocol
from backup_pipelines.engine.wal.worker import IDLE_SECONDS
from backup_pipelines_tests.pitr_support import (
    PASSWORD,
    TARGET,
    PitrSetup,
    chown_to_server_user,
    start_pitr_cluster,
)

VENV_BIN = Path(sys.executable).parent
SEGMENTS = 8


def stop_worker(spool: Path) -> None:
    """Kill the spool's worker, if one runs, and wait until it is gone."""
    for _ in range(200):
        pid = spool_protocol.worker_pid(str(spool))
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    raise AssertionError(f"the worker of {spool} does not stop")


@pytest.fixture
def spools() -> Iterator[list[Path]]:
    """Spools whose workers are stopped when the test ends, whatever happened."""
    used: list[Path] = []
    yield used
    for spool in used:
        stop_worker(spool)


@pytest.fixture(scope="module")
def real_segments() -> Iterator[list[Path]]:
    """Real 16 MiB WAL segments with data in them, copied out by a plain archive_command."""
    root = Path(tempfile.mkdtemp(prefix="bp-async-segments-"))
    root.chmod(0o755)
    copies = root / "copies"
    copies.mkdir()
    chown_to_server_user(copies)
    cluster = init_cluster(
        root / "pg",
        extra_conf={
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": f"'cp %p {copies}/%f'",
        },
    )
    try:
        cluster.psql("CREATE TABLE filler (id int, payload text)")
        for round_ in range(SEGMENTS):
            cluster.psql(
                f"INSERT INTO filler SELECT g, md5(g::text) FROM generate_series(1, {20000 + round_}) g"
            )
            cluster.psql("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 120
        while len([p for p in copies.iterdir() if len(p.name) == 24]) < SEGMENTS:
            assert time.monotonic() < deadline, "the cluster did not archive its segments"
            time.sleep(0.2)
    finally:
        cluster.stop("immediate")
    found = sorted(p for p in copies.iterdir() if len(p.name) == 24)[:SEGMENTS]
    yield found
    shutil.rmtree(root, ignore_errors=True)


def _pg_wal(folder: Path, segments: list[Path], *, ready: bool = True) -> Path:
    """A pg_wal folder as PostgreSQL leaves it: finished segments marked ``.ready``."""
    wal = folder / "pg_wal"
    (wal / "archive_status").mkdir(parents=True)
    for segment in segments:
        shutil.copyfile(segment, wal / segment.name)
        if ready:
            (wal / "archive_status" / f"{segment.name}.ready").touch()
    return wal


@pytest.fixture
def async_project(tmp_path: Path, make_project, spools: list[Path]) -> Callable[..., Path]:  # type: ignore[no-untyped-def]
    """An async target archiving into tmp_path/archive through the given spool."""

    def make(spool: Path, **pitr: object) -> Path:
        archive = tmp_path / "archive"
        archive.mkdir(mode=0o700, exist_ok=True)
        spools.append(spool)
        make_project(
            {
                TARGET: {
                    "dsn_env": "UNUSED_DSN",
                    "pitr": {
                        "archive_dir": str(archive),
                        "async_archive": True,
                        "spool_dir": str(spool),
                        **pitr,
                    },
                }
            }
        )
        return archive

    return make


def _push(run_cli, spool: Path, path: Path) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return run_cli("wal-push", "--target", TARGET, "--spool-dir", str(spool), str(path))


def _fetch(run_cli, spool: Path, name: str, dest: Path, *, sync: bool = False):  # type: ignore[no-untyped-def]
    spool_args = [] if sync else ["--spool-dir", str(spool)]
    return run_cli("wal-fetch", "--target", TARGET, *spool_args, name, str(dest))


@pytest.mark.postgres
def test_the_exit_contract_holds_in_async_mode(  # type: ignore[no-untyped-def]
    real_segments: list[Path], tmp_path: Path, async_project, run_cli
) -> None:
    spool = tmp_path / "spool"
    archive = async_project(spool, prefetch_segments=2)
    wal = _pg_wal(tmp_path, real_segments[:4])
    first, second = real_segments[0].name, real_segments[1].name

    pushed = _push(run_cli, spool, wal / first)
    assert pushed.returncode == 0, pushed.stderr
    assert "is stored in" in pushed.stderr
    # Stored, durably, by the time the command said so: readable without the spool.
    out = tmp_path / "check"
    assert _fetch(run_cli, spool, first, out, sync=True).returncode == 0
    assert out.read_bytes() == real_segments[0].read_bytes()

    again = _push(run_cli, spool, wal / first)  # identical content: fine again
    assert again.returncode == 0, again.stderr

    impostor_dir = tmp_path / "other"
    impostor_dir.mkdir()
    impostor = impostor_dir / first
    impostor.write_bytes(real_segments[1].read_bytes())
    refused = _push(run_cli, spool, impostor)
    assert refused.returncode == 1
    assert "DIFFERENT" in refused.stderr and "Nothing was overwritten" in refused.stderr
    assert _fetch(run_cli, spool, first, out, sync=True).returncode == 0
    assert out.read_bytes() == real_segments[0].read_bytes()

    missing = _push(run_cli, spool, wal / "000000010000000000000099")
    assert missing.returncode == 1
    assert "wal-push FAILED" in missing.stderr

    # Fetch: served from the prefetch spool, identical bytes; absent -> 1; damaged -> 2.
    assert _push(run_cli, spool, wal / second).returncode == 0
    recovering = tmp_path / "recovering"
    recovering.mkdir()
    got = _fetch(run_cli, spool, first, recovering / "RECOVERYXLOG")
    assert got.returncode == 0, got.stderr
    assert (recovering / "RECOVERYXLOG").read_bytes() == real_segments[0].read_bytes()
    absent = _fetch(run_cli, spool, "0000000A0000000000000001", recovering / "X")
    assert absent.returncode == 1
    assert "not in the WAL archive" in absent.stderr
    assert not (recovering / "X").exists()

    stored = next(archive.rglob(f"{second}.zst"))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    stop_worker(spool)  # nothing prefetched before the damage may answer for it
    shutil.rmtree(spool / "fetch", ignore_errors=True)
    damaged = _fetch(run_cli, spool, second, recovering / "RECOVERYXLOG2")
    assert damaged.returncode == 2, damaged.stderr
    assert "damaged" in damaged.stderr or "does not match" in damaged.stderr
    assert not (recovering / "RECOVERYXLOG2").exists()
    for result in (pushed, again, refused, missing, got, absent, damaged):
        assert result.returncode <= 125


@pytest.mark.postgres
def test_a_worker_killed_mid_push_never_leaves_a_false_success(  # type: ignore[no-untyped-def]
    real_segments: list[Path], tmp_path: Path, async_project, run_cli
) -> None:
    spool = tmp_path / "spool"
    archive = async_project(spool, async_workers=1)
    wal = _pg_wal(tmp_path, real_segments)
    first = real_segments[0].name
    waiting = subprocess.Popen(
        [str(VENV_BIN / "backup-pipelines"), "wal-push", "--target", TARGET,
         "--spool-dir", str(spool), str(wal / first)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while spool_protocol.worker_pid(str(spool)) is None:
            assert time.monotonic() < deadline, "no worker started"
            time.sleep(0.01)
        killed = spool_protocol.worker_pid(str(spool))
        # Let it get into the read-ahead, then kill it in the middle of whatever it does.
        while not list(archive.rglob("*.meta")) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        stdout, stderr = waiting.communicate(timeout=300)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    # The waiting call got a real answer (from a replacement when the killed worker had not
    # answered yet).
    assert waiting.returncode == 0, stderr
    while spool_protocol.worker_pid(str(spool)) == killed:  # SIGKILL waits for a pending fsync
        assert time.monotonic() < deadline + 60, "the killed worker is still there"
        time.sleep(0.05)

    # Whatever the spool says is stored is stored, intact.
    for ok in (spool / "push").glob("*.ok"):
        name = ok.name[: -len(".ok")]
        out = tmp_path / f"check-{name}"
        fetched = _fetch(run_cli, spool, name, out, sync=True)
        assert fetched.returncode == 0, f"{name} reported archived but: {fetched.stderr}"
        assert out.read_bytes() == (wal / name).read_bytes()

    # PostgreSQL's calls for every segment succeed; each is then exactly in the archive.
    for segment in real_segments:
        result = _push(run_cli, spool, wal / segment.name)
        assert result.returncode == 0, result.stderr
        (wal / "archive_status" / f"{segment.name}.ready").rename(
            wal / "archive_status" / f"{segment.name}.done"
        )
    for segment in real_segments:
        out = tmp_path / f"final-{segment.name}"
        assert _fetch(run_cli, spool, segment.name, out, sync=True).returncode == 0
        assert out.read_bytes() == segment.read_bytes()
    leftovers = [
        p.name for p in archive.rglob("*") if p.is_file() and p.suffix not in (".zst", ".meta")
    ]
    assert leftovers == []

    # Idle workers go away on their own.
    deadline = time.monotonic() + IDLE_SECONDS + 30
    while spool_protocol.worker_pid(str(spool)) is not None:
        assert time.monotonic() < deadline, "the worker did not exit when idle"
        time.sleep(0.2)


@pytest.mark.postgres
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_a_full_spool_fails_clearly_and_recovery_falls_back(  # type: ignore[no-untyped-def]
    real_segments: list[Path], tmp_path: Path, async_project, run_cli
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(spool)],
                   check=True)  # fmt: skip
    try:
        archive = async_project(spool)
        wal = _pg_wal(tmp_path, real_segments[:2], ready=False)  # no read-ahead
        first = real_segments[0].name
        # Archived while there was room; then the spool fills up.
        assert _push(run_cli, spool, wal / first).returncode == 0
        stop_worker(spool)
        filler = spool / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
        assert shutil.disk_usage(spool).free < 4096
        second = real_segments[1].name
        full = _push(run_cli, spool, wal / second)
        assert full.returncode == 1
        assert "No space left on device" in full.stderr and str(spool) in full.stderr
        assert not list(archive.rglob(f"{second}.meta"))

        # Recovery does not depend on the spool: it fetches directly.
        out = tmp_path / "RECOVERYXLOG"
        fetched = _fetch(run_cli, spool, first, out)
        assert fetched.returncode == 0, fetched.stderr
        assert out.read_bytes() == real_segments[0].read_bytes()

        filler.unlink()
        assert _push(run_cli, spool, wal / second).returncode == 0
        assert list(archive.rglob(f"{second}.meta"))
    finally:
        stop_worker(spool)
        subprocess.run(["umount", str(spool)], check=False)


@pytest.fixture
def async_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[PitrSetup, Path]]:
    holder = Path(tempfile.mkdtemp(prefix="bp-async-spool-"))
    holder.chmod(0o755)
    spool = holder / "spool"
    spool.mkdir(mode=0o700)
    chown_to_server_user(spool)
    setup = start_pitr_cluster(
        monkeypatch,
        pitr={"async_archive": True, "spool_dir": str(spool), "prefetch_segments": 4},
    )
    try:
        yield setup, spool
    finally:
        setup.close()
        stop_worker(spool)
        shutil.rmtree(holder, ignore_errors=True)


@pytest.mark.postgres
def test_pitr_with_async_archiving_and_prefetch_gives_the_rows_at_the_target(  # type: ignore[no-untyped-def]
    async_cluster: tuple[PitrSetup, Path], run_cli
) -> None:
    setup, spool = async_cluster
    shown = run_cli("wal-setup", TARGET)
    assert shown.returncode == 0, shown.stderr
    assert f"--spool-dir {spool} %p'" in shown.stdout

    setup.sql("CREATE TABLE ledger (id int, amount int, pad text)")
    backup = run_cli("base-backup", TARGET)
    assert backup.returncode == 0, backup.stderr
    for round_ in range(4):  # several segments, so that recovery has something to prefetch
        setup.sql(
            f"INSERT INTO ledger SELECT g, {round_}, repeat('x', 200) "
            "FROM generate_series(1, 20000) g"
        )
        setup.switch_and_wait()
    time.sleep(0.2)
    moment = setup.sql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
    )
    time.sleep(0.2)
    setup.sql("UPDATE ledger SET amount = -1")  # the accident
    setup.switch_and_wait()
    assert setup.sql("SELECT failed_count FROM pg_stat_archiver") == "0"

    port = free_port()
    data_dir = setup.workdir / "restore" / "data"
    restored = run_cli(
        "pitr-restore", TARGET, "--to", moment, "--data-dir", str(data_dir),
        "--port", str(port), "--start",
    )  # fmt: skip
    copy = LocalCluster(root=data_dir.parent, port=port, password=PASSWORD)
    try:
        assert restored.returncode == 0, restored.stderr
        assert (
            copy.psql("SELECT count(*), sum(amount), min(amount) FROM ledger") == "80000|120000|0"
        )
    finally:
        copy.pg_ctl("-m", "immediate", "stop")
    auto_conf = (data_dir / "postgresql.auto.conf").read_text()
    assert f"--spool-dir {spool} %f %p" in auto_conf
    recovery_log = "".join(p.read_text(errors="replace") for p in data_dir.glob("*.log"))
    assert "prefetched and verified" in recovery_log


def test_only_what_wal_setup_prints_takes_the_fast_path() -> None:
    from backup_pipelines.cli.wal_async import _parse

    printed = ["--config", "/etc/bp.yaml", "wal-push", "--target", "main", "--spool-dir", "/s"]
    parsed = _parse([*printed, "pg_wal/000000010000000000000001"])
    assert parsed is not None and parsed["command"] == "wal-push"
    assert _parse(["wal-fetch", "--spool-dir=/s", "000000010000000000000001", "pg_wal/X"])
    # Anything else runs the ordinary (synchronous) command, which knows every option.
    assert _parse([*printed, "--name", "X", "pg_wal/000000010000000000000001"]) is None
    assert _parse([*printed]) is None
    assert _parse(["wal-push", "pg_wal/000000010000000000000001"]) is None
    assert _parse(["--unknown", "wal-push", "--spool-dir", "/s", "p"]) is None


def test_an_ok_about_another_file_of_the_same_name_is_no_answer(tmp_path: Path) -> None:
    segment = tmp_path / "000000010000000000000001"
    segment.write_bytes(b"x" * 100)
    base = str(tmp_path / segment.name)
    info = segment.stat()
    stale = {**spool_protocol.file_identity(info), "inode": info.st_ino + 1, "stored": "/a"}
    spool_protocol.write_status(base + ".ok", stale)
    assert spool_protocol._push_answer(base, info) is None
    assert not os.path.exists(base + ".ok")  # discarded, never reported
    spool_protocol.write_status(
        base + ".ok", {**spool_protocol.file_identity(info), "stored": "/a"}
    )
    assert spool_protocol._push_answer(base, info) == (0, f"{segment.name} is stored in /a")


def test_async_mode_is_in_the_commands_wal_setup_prints(make_project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from backup_pipelines.engine.wal import archive_command, restore_command

    pitr = {"archive_dir": str(tmp_path / "a"), "spool_dir": str(tmp_path / "s")}
    config = make_project({TARGET: {"dsn_env": "X", "pitr": pitr}})
    assert "--spool-dir" not in archive_command(config, config.target(TARGET))
    config = make_project({TARGET: {"dsn_env": "X", "pitr": {**pitr, "async_archive": True}}})
    target = config.target(TARGET)
    assert archive_command(config, target).endswith(f"--spool-dir {tmp_path / 's'} %p")
    assert restore_command(config, target).endswith(f"--spool-dir {tmp_path / 's'} %f %p")
    with pytest.raises(Exception, match="async_archive needs spool_dir"):
        make_project(
            {TARGET: {"dsn_env": "X", "pitr": {"archive_dir": "/a", "async_archive": True}}}
        )


@pytest.mark.postgres
def test_async_archiving_to_s3_stores_every_segment_and_prefetches_it_back(  # type: ignore[no-untyped-def]
    real_segments: list[Path], tmp_path: Path, make_project, spools: list[Path], aws_env: str,
    run_cli,
) -> None:  # fmt: skip
    """The worker sends to S3 (moto's server over HTTP) what the synchronous command would:
    wal-push answers 0 only once the object is in the bucket, and recovery's fetches through
    the prefetching worker return the exact bytes, or refuse a damaged object."""
    client = boto3.client("s3", endpoint_url=aws_env, region_name="us-east-1")
    bucket = f"async-wal-{os.getpid()}-{time.monotonic_ns()}"
    client.create_bucket(Bucket=bucket)
    spool = tmp_path / "spool"
    spools.append(spool)
    pitr = {
        "archive_s3": f"s3://{bucket}/wal/{TARGET}",
        "async_archive": True,
        "spool_dir": str(spool),
        "prefetch_segments": 2,
    }
    make_project({TARGET: {"dsn_env": "UNUSED_DSN", "pitr": pitr}})
    segments = real_segments[:4]
    wal = _pg_wal(tmp_path, segments)

    for segment in segments:
        pushed = _push(run_cli, spool, wal / segment.name)
        assert pushed.returncode == 0, pushed.stderr
        # Stored in the bucket by the time the command said so.
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
        stem = f"wal/{TARGET}/{object_stem(segment.name)}"
        assert {f"{stem}.zst", f"{stem}.meta"} <= keys
    for segment in segments:
        out = tmp_path / f"direct-{segment.name}"
        assert _fetch(run_cli, spool, segment.name, out, sync=True).returncode == 0
        assert out.read_bytes() == segment.read_bytes()

    recovering = tmp_path / "recovering"
    recovering.mkdir()
    for segment in segments[:3]:
        got = _fetch(run_cli, spool, segment.name, recovering / "RECOVERYXLOG")
        assert got.returncode == 0, got.stderr
        assert (recovering / "RECOVERYXLOG").read_bytes() == segment.read_bytes()
    absent = _fetch(run_cli, spool, "0000000A0000000000000001", recovering / "X")
    assert absent.returncode == 1 and "not in the WAL archive" in absent.stderr

    last = segments[3].name
    key = f"wal/{TARGET}/{object_stem(last)}.zst"
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    stop_worker(spool)  # nothing prefetched before the damage may answer for it
    shutil.rmtree(spool / "fetch", ignore_errors=True)
    damaged = _fetch(run_cli, spool, last, recovering / "RECOVERYXLOG4")
    assert damaged.returncode == 2, damaged.stderr
    assert not (recovering / "RECOVERYXLOG4").exists()
