"""A person's view: the real Dagster UI in headless Debian Chromium (Playwright, system browser).

A real backup is materialized, its file is tampered with, the checks run again; the UI shows the
backup asset with its metadata and the failed ``checksum_matches`` check. Screenshots are saved
to the test artifacts folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from backup_pipelines.definitions import defs as load_defs
from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.devtools.webserver import graphql, start_webserver, stop_process_group
from backup_pipelines_tests.conftest import REPO_ROOT

APP = dg.AssetKey(["app", "logical_backup"])
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


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

    proc, url = start_webserver(dict(os.environ), tmp_path / "webserver.log", cwd=REPO_ROOT)
    try:
        graphql(url, "mutation { setNuxSeen }")
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
        stop_process_group(proc)
    assert (artifacts_dir / "ui_failed_checksum_check.png").stat().st_size > 10_000
