"""A person's view: the real Dagster UI in headless Debian Chromium (Playwright, system browser).

A real backup is materialized, its file is tampered with, the checks run again; the UI shows the
backup asset with its metadata and the failed ``checksum_matches`` check. Screenshots are saved
to the test artifacts folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from backup_pipelines.definitions import defs as load_defs
from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines_tests.conftest import REPO_ROOT, VENV_BIN
from backup_pipelines_tests.deploy.daemon_support import stop

APP = dg.AssetKey(["app", "logical_backup"])
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _start_webserver(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [
                str(VENV_BIN / "dagster-webserver"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-m",
                "backup_pipelines.definitions",
            ],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO_ROOT,
        )
    deadline = time.monotonic() + 180
    while True:
        try:
            nodes = _graphql(url, "{ assetNodes { assetKey { path } } }")
            if nodes.get("data", {}).get("assetNodes"):
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise AssertionError("dagster-webserver did not come up:\n" + log.read_text()[-4000:])
        time.sleep(0.25)


@pytest.mark.daemon
@pytest.mark.browser
def test_ui_shows_backup_metadata_and_the_failed_checksum_check(
    pg: LocalCluster, sample_db: str, make_project, tmp_path: Path, monkeypatch, artifacts_dir: Path
) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: run scripts/bootstrap.sh")
    from playwright.sync_api import sync_playwright

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    make_project({"app": {"dsn_env": "DB_APP"}}, env={"DB_APP": pg.dsn(sample_db)})
    definitions = load_defs()

    with dg.DagsterInstance.get() as instance:
        backup = definitions.resolve_job_def("logical_backups").execute_in_process(
            instance=instance, asset_selection=[APP]
        )
        assert backup.success
        metadata = backup.get_asset_materialization_events()[0].materialization.metadata
        path = Path(str(metadata["path"].value))
        size = metadata["size_bytes"].value
        with path.open("r+b") as handle:
            handle.seek(100)
            handle.write(b"tampered!")
        verify = dg.define_asset_job(
            "verify_app_checksum",
            selection=dg.AssetSelection.checks(dg.AssetCheckKey(APP, "checksum_matches")),
        )
        checks = dg.Definitions.merge(definitions, dg.Definitions(jobs=[verify]))
        result = checks.resolve_job_def("verify_app_checksum").execute_in_process(
            instance=instance, raise_on_error=False
        )
        assert not result.success

    proc, url = _start_webserver(dict(os.environ), tmp_path / "webserver.log")
    try:
        _graphql(url, "mutation { setNuxSeen }")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, args=BROWSER_ARGS, headless=True
            )
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{url}/assets/app/logical_backup", wait_until="domcontentloaded")
                page.get_by_text("size_bytes").first.wait_for(timeout=60_000)
                body = page.inner_text("body")
                assert "logical_backup" in body
                assert "sha256" in body and "row_counts" in body
                assert f"{size:,}" in body or str(size) in body
                page.screenshot(path=str(artifacts_dir / "ui_backup_asset.png"), full_page=True)

                page.goto(
                    f"{url}/assets/app/logical_backup?view=checks", wait_until="domcontentloaded"
                )
                page.get_by_text("checksum_matches").first.wait_for(timeout=60_000)
                page.get_by_text("checksum_matches").first.click()
                page.get_by_text("This is a blocking asset check").wait_for(timeout=60_000)
                page.get_by_text("Failed").first.wait_for(timeout=60_000)
                checks_text = page.inner_text("body")
                assert "archive_readable" in checks_text
                # The check's own explanation of what is wrong with the file.
                assert path.name in checks_text and "SHA-256 mismatch" in checks_text
                assert checks_text.count("Failed") >= 2, checks_text
                page.screenshot(
                    path=str(artifacts_dir / "ui_failed_checksum_check.png"), full_page=True
                )
            finally:
                browser.close()
    finally:
        stop(proc)
    assert (artifacts_dir / "ui_failed_checksum_check.png").stat().st_size > 10_000
