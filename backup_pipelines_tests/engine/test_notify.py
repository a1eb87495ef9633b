"""Notifiers deliver to real servers: aiosmtpd over STARTTLS/SSL with AUTH, local HTTP webhooks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from backup_pipelines.devtools.local_postgres import free_port
from backup_pipelines.engine.config import NotifierSettings
from backup_pipelines.engine.notify import Alert, send_alert
from backup_pipelines_tests.alert_receivers import smtp_server, webhook_receiver

NOTIFIER = TypeAdapter(NotifierSettings)

ALERT = Alert(
    title="logical_backup failed",
    message="The backup of production failed.",
    target="production",
    what="logical_backup",
    reason="connection to server at 127.0.0.1:5432 refused",
    link="http://dagster.example:3000/runs/abc123",
)


def _email(server, security: str) -> object:
    return NOTIFIER.validate_python(
        {
            "type": "email",
            "host": server.host,
            "port": server.port,
            "security": security,
            "username_env": "SMTP_USER",
            "password_env": "SMTP_PASSWORD",
            "sender": "backups@example.com",
            "to": ["oncall@example.com", "dba@example.com"],
            "ca_file": str(server.ca_file),
        }
    )


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_email_over_tls_with_login(
    security: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with smtp_server(tmp_path, mode=security) as server:
        monkeypatch.setenv("SMTP_USER", server.username)
        monkeypatch.setenv("SMTP_PASSWORD", server.password)
        report = send_alert([_email(server, security)], ALERT)
        assert report.ok, report.failed
        (message,) = server.wait_for(1)
    assert server.logins == [server.username]
    assert message["Subject"] == "[backup_pipelines] FAILED production: logical_backup failed"
    assert message["To"] == "oncall@example.com, dba@example.com"
    body = message.get_content()
    assert "connection to server at 127.0.0.1:5432 refused" in body
    assert "http://dagster.example:3000/runs/abc123" in body
    assert "Target:   production" in body


def test_wrong_smtp_password_is_reported_without_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with smtp_server(tmp_path) as server:
        monkeypatch.setenv("SMTP_USER", server.username)
        monkeypatch.setenv("SMTP_PASSWORD", "not-the-password-xyz")
        with caplog.at_level(logging.ERROR):
            report = send_alert([_email(server, "starttls")], ALERT)
    assert report.failed == {"email": "SMTP authentication failed (535)"}
    assert server.messages == []
    assert "not-the-password-xyz" not in caplog.text
    assert "notifier email failed" in caplog.text


def test_slack_and_webhook_payloads(monkeypatch: pytest.MonkeyPatch) -> None:
    with webhook_receiver() as hooks:
        monkeypatch.setenv("SLACK_URL", f"{hooks.url}/services/T000/B000/secret")
        monkeypatch.setenv("HOOK_TOKEN", "tok-123")
        notifiers = [
            NOTIFIER.validate_python({"type": "slack", "webhook_url_env": "SLACK_URL"}),
            NOTIFIER.validate_python(
                {"type": "webhook", "url": f"{hooks.url}/alerts", "bearer_token_env": "HOOK_TOKEN"}
            ),
        ]
        report = send_alert(notifiers, ALERT)
        assert report.delivered == ["slack", "webhook"]
    slack = hooks.bodies("/services/T000/B000/secret")[0]
    assert "production" in slack["text"] and "abc123" in slack["text"]
    assert slack["blocks"][0]["type"] == "section"
    (generic_request,) = [r for r in hooks.requests if r["path"] == "/alerts"]
    assert generic_request["headers"]["Authorization"] == "Bearer tok-123"
    generic = generic_request["json"]
    assert generic["status"] == "firing"
    assert generic["target"] == "production"
    assert generic["what"] == "logical_backup"
    assert generic["link"] == "http://dagster.example:3000/runs/abc123"


def test_a_broken_notifier_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dead_port = free_port()
    with webhook_receiver() as hooks, webhook_receiver() as failing, smtp_server(tmp_path) as smtp:
        failing.status = 500
        monkeypatch.setenv("SMTP_USER", smtp.username)
        monkeypatch.setenv("SMTP_PASSWORD", smtp.password)
        notifiers = [
            NOTIFIER.validate_python(
                {
                    "type": "webhook",
                    "name": "nobody-listens",
                    "url": f"http://127.0.0.1:{dead_port}/x",
                }
            ),
            NOTIFIER.validate_python({"type": "webhook", "name": "http-500", "url": failing.url}),
            NOTIFIER.validate_python({"type": "slack", "webhook_url_env": "UNSET_SLACK_URL_VAR"}),
            _email(smtp, "starttls"),
            NOTIFIER.validate_python({"type": "webhook", "url": hooks.url}),
        ]
        with caplog.at_level(logging.ERROR):
            report = send_alert(notifiers, ALERT)
        assert len(smtp.wait_for(1)) == 1
    assert report.delivered == ["email", "webhook"]
    assert set(report.failed) == {"webhook:nobody-listens", "webhook:http-500", "slack"}
    assert report.failed["webhook:http-500"] == "HTTP 500 Internal Server Error"
    assert "UNSET_SLACK_URL_VAR" in report.failed["slack"]
    assert len(hooks.requests) == 1
    assert caplog.text.count("failed to deliver") == 3


def test_notifier_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="exactly one of 'url' and 'url_env'"):
        NOTIFIER.validate_python({"type": "webhook"})
    with pytest.raises(ValidationError):
        NOTIFIER.validate_python({"type": "pager", "url": "http://x"})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        NOTIFIER.validate_python(
            {"type": "slack", "webhook_url_env": "X", "webhook_url": "http://x"}
        )
    email = NOTIFIER.validate_python(
        {"type": "email", "host": "mail", "security": "ssl", "sender": "a@b", "to": ["c@d"]}
    )
    assert email.effective_port == 465


def test_no_notifiers_only_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        report = send_alert([], ALERT)
    assert report.ok and report.delivered == []
    assert "no notifiers configured" in caplog.text
