"""Alerts to people: email (SMTP with STARTTLS or SSL), Slack incoming webhooks, JSON webhooks.

Usage from any area (plain Python, no Dagster)::

    from backup_pipelines.engine.notify import Alert, send_alert

    report = send_alert(config, Alert(
        title="WAL archive stalled",
        message="No WAL segment archived for 25 minutes (limit 15).",
        target="production",
        what="wal_archive",
        reason="archive_command failing: No space left on device",
        link="http://dagster:3000/assets/production/wal_archive",
    ))
    # report.delivered / report.failed: names of the notifiers

``config`` is the ``ProjectConfig`` (its top-level ``notifiers:`` list) or a list of notifier
settings. Every notifier is tried; one that fails is logged (without secrets) and never stops
the others, and ``send_alert`` itself never raises for a delivery problem. Secrets (SMTP
password, webhook URLs with tokens, bearer tokens) are read from environment variables named in
the config, at send time.
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Literal

from backup_pipelines.engine.config import (
    EmailNotifierSettings,
    ProjectConfig,
    SlackNotifierSettings,
    WebhookNotifierSettings,
)
from backup_pipelines.engine.errors import ConfigError

logger = logging.getLogger("backup_pipelines.notify")

Severity = Literal["critical", "warning", "resolved", "info"]
Notifier = EmailNotifierSettings | SlackNotifierSettings | WebhookNotifierSettings

_SLACK_EMOJI = {
    "critical": ":rotating_light:",
    "warning": ":warning:",
    "resolved": ":white_check_mark:",
    "info": ":information_source:",
}
USER_AGENT = "backup_pipelines-notify/1"


@dataclass(frozen=True)
class Alert:
    """One thing a person must know: what failed, on which target, why, and where to look."""

    title: str
    message: str
    severity: Severity = "critical"
    target: str | None = None
    what: str | None = None
    reason: str | None = None
    link: str | None = None
    # Groups a "resolved" message with the alert it ends (e.g. "stale:production").
    incident: str | None = None
    details: dict[str, str] = field(default_factory=dict)
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def subject(self) -> str:
        prefix = {
            "critical": "FAILED",
            "warning": "WARNING",
            "resolved": "RESOLVED",
            "info": "INFO",
        }
        scope = f" {self.target}:" if self.target else ""
        return f"[backup_pipelines] {prefix[self.severity]}{scope} {self.title}"

    def text(self) -> str:
        """The plain-text body every notifier shows."""
        lines = [self.message, ""]
        if self.target:
            lines.append(f"Target:   {self.target}")
        if self.what:
            lines.append(f"What:     {self.what}")
        if self.reason:
            lines.append(f"Reason:   {self.reason}")
        for key, value in self.details.items():
            lines.append(f"{key}: {value}")
        lines.append(f"When:     {self.occurred_at.astimezone(UTC).isoformat(timespec='seconds')}")
        if self.link:
            lines.append(f"Details:  {self.link}")
        return "\n".join(lines).strip() + "\n"

    def as_json(self) -> dict[str, object]:
        payload = asdict(self)
        payload["occurred_at"] = self.occurred_at.astimezone(UTC).isoformat()
        payload["status"] = "resolved" if self.severity == "resolved" else "firing"
        payload["subject"] = self.subject
        payload["source"] = "backup_pipelines"
        return payload


@dataclass
class DeliveryReport:
    delivered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


class NotifyError(Exception):
    """A notifier could not deliver; the message is safe to log (no secrets)."""


def send_alert(
    config: ProjectConfig | Sequence[Notifier] | None,
    alert: Alert,
    *,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> DeliveryReport:
    """Send ``alert`` through every configured notifier; never raises for delivery problems."""
    log = log or logger
    notifiers: Iterable[Notifier]
    if config is None:
        notifiers = []
    elif isinstance(config, ProjectConfig):
        notifiers = config.notifiers
    else:
        notifiers = config
    report = DeliveryReport()
    notifiers = list(notifiers)
    if not notifiers:
        log.warning(f"alert not sent (no notifiers configured): {alert.subject}")
        return report
    for notifier in notifiers:
        label = (
            f"{notifier.type}:{notifier.name}" if notifier.name != notifier.type else notifier.type
        )
        try:
            _SENDERS[notifier.type](notifier, alert)
        except Exception as exc:  # one broken notifier must not silence the others
            reason = _safe_reason(exc)
            report.failed[label] = reason
            log.error(f"notifier {label} failed to deliver '{alert.subject}': {reason}")
        else:
            report.delivered.append(label)
            log.info(f"notifier {label} delivered '{alert.subject}'")
    return report


def _safe_reason(exc: BaseException) -> str:
    if isinstance(exc, NotifyError | ConfigError):
        return str(exc)
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect: {exc.reason}"
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return f"SMTP authentication failed ({exc.smtp_code})"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"SMTP error {exc.smtp_code}"
    # Exception texts of socket/ssl errors carry no secrets; name the class for clarity.
    return f"{type(exc).__name__}: {exc}"


def _env(variable: str, notifier: Notifier, field_name: str) -> str:
    value = os.environ.get(variable, "")
    if not value:
        raise ConfigError(
            f"notifier {notifier.name}: environment variable {variable} ({field_name}) is not set",
            hint=f"export {variable}=... where the Dagster daemon and the CLI run",
        )
    return value


def _tls_context(ca_file: object | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def send_email(settings: EmailNotifierSettings, alert: Alert) -> None:
    message = EmailMessage()
    message["Subject"] = alert.subject
    message["From"] = settings.sender
    message["To"] = ", ".join(settings.to)
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="backup-pipelines")
    message["X-Backup-Pipelines-Severity"] = alert.severity
    if alert.incident:
        message["X-Backup-Pipelines-Incident"] = alert.incident
    message.set_content(alert.text())

    username = (
        _env(settings.username_env, settings, "username_env") if settings.username_env else None
    )
    password = (
        _env(settings.password_env, settings, "password_env") if settings.password_env else None
    )
    port = settings.effective_port
    timeout = settings.timeout_seconds
    smtp: smtplib.SMTP
    if settings.security == "ssl":
        smtp = smtplib.SMTP_SSL(
            settings.host, port, timeout=timeout, context=_tls_context(settings.ca_file)
        )
    else:
        smtp = smtplib.SMTP(settings.host, port, timeout=timeout)
    with smtp:
        smtp.ehlo()
        if settings.security == "starttls":
            smtp.starttls(context=_tls_context(settings.ca_file))
            smtp.ehlo()
        if username is not None:
            if password is None:
                raise NotifyError(
                    f"notifier {settings.name}: username_env set without password_env"
                )
            smtp.login(username, password)
        smtp.send_message(message)


def _post_json(
    url: str, payload: Mapping[str, Any], timeout: float, headers: dict[str, str] | None = None
) -> None:
    if not url.startswith(("http://", "https://")):
        raise NotifyError("webhook URL must start with http:// or https://")
    request = urllib.request.Request(
        url,
        data=json.dumps(payload, default=str).encode("utf-8"),
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": USER_AGENT, **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only)
        if not 200 <= response.status < 300:
            raise NotifyError(f"HTTP {response.status}")


def send_slack(settings: SlackNotifierSettings, alert: Alert) -> None:
    url = _env(settings.webhook_url_env, settings, "webhook_url_env")
    headline = f"{_SLACK_EMOJI[alert.severity]} *{alert.subject}*"
    body = alert.text()
    payload = {
        "text": f"{headline}\n{body}",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": headline}},
            {"type": "section", "text": {"type": "mrkdwn", "text": f"```{body}```"}},
        ],
    }
    _post_json(url, payload, settings.timeout_seconds)


def send_webhook(settings: WebhookNotifierSettings, alert: Alert) -> None:
    url = settings.url or _env(settings.url_env or "", settings, "url_env")
    headers = {}
    if settings.bearer_token_env:
        token = _env(settings.bearer_token_env, settings, "bearer_token_env")
        headers["Authorization"] = f"Bearer {token}"
    _post_json(url, alert.as_json(), settings.timeout_seconds, headers)


_SENDERS: dict[str, Callable[[Any, Alert], None]] = {
    "email": send_email,
    "slack": send_slack,
    "webhook": send_webhook,
}
