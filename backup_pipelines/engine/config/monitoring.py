"""Running unattended (README "Running in production"): notifiers, alert wording, metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from backup_pipelines.engine.config.fields import EnvVarName, StrictModel, absolute_path


class EmailNotifierSettings(StrictModel):
    """Alerts by email. The SMTP password comes from the environment variable ``password_env``."""

    type: Literal["email"]
    name: str = "email"
    host: str
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Default: 587 (starttls), 465 (ssl), 25."
    )
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username_env: EnvVarName | None = None
    password_env: EnvVarName | None = None
    sender: str = Field(description="From: address.")
    to: list[str] = Field(min_length=1)
    ca_file: Path | None = Field(
        default=None, description="PEM bundle to trust instead of the system CAs (internal relay)."
    )
    timeout_seconds: float = Field(default=15, gt=0, le=300)

    @field_validator("ca_file")
    @classmethod
    def _absolute_ca_file(cls, value: Path | None) -> Path | None:
        return absolute_path(value, "ca_file")

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return {"starttls": 587, "ssl": 465, "none": 25}[self.security]


class SlackNotifierSettings(StrictModel):
    """Alerts to a Slack incoming webhook; its URL (a secret) comes from ``webhook_url_env``."""

    type: Literal["slack"]
    name: str = "slack"
    webhook_url_env: EnvVarName
    timeout_seconds: float = Field(default=15, gt=0, le=300)


class WebhookNotifierSettings(StrictModel):
    """Alerts POSTed as JSON to any URL (``url``, or ``url_env`` when the URL holds a token)."""

    type: Literal["webhook"]
    name: str = "webhook"
    url: str | None = None
    url_env: EnvVarName | None = None
    bearer_token_env: EnvVarName | None = Field(
        default=None,
        description="Environment variable with a token sent as 'Authorization: Bearer'.",
    )
    timeout_seconds: float = Field(default=15, gt=0, le=300)

    @model_validator(mode="after")
    def _one_url(self) -> WebhookNotifierSettings:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("set exactly one of 'url' and 'url_env'")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("'url' must start with http:// or https://")
        return self


NotifierSettings = Annotated[
    EmailNotifierSettings | SlackNotifierSettings | WebhookNotifierSettings,
    Field(discriminator="type"),
]


class AlertSettings(StrictModel):
    """How alerts are worded and linked (top-level key ``alerts:``)."""

    ui_base_url: str = Field(
        default="http://localhost:3000",
        description="Where operators open the Dagster UI; alerts link to <ui_base_url>/runs/<id>.",
    )
    send_resolved: bool = Field(
        default=True, description="Also notify when a stale target has a fresh backup again."
    )
    stale_check_interval_seconds: int = Field(default=300, ge=30, le=86400)


class MetricsSettings(StrictModel):
    """Prometheus export (top-level key ``metrics:``): a node_exporter textfile and/or a Pushgateway."""

    textfile: Path | None = Field(
        default=None,
        description="e.g. /var/lib/prometheus/node-exporter/backup_pipelines.prom (written atomically).",
    )
    pushgateway_url: str | None = Field(default=None, description="e.g. http://pushgateway:9091")
    pushgateway_job: str = "backup_pipelines"
    interval_seconds: int = Field(default=60, ge=15, le=86400)

    @field_validator("textfile")
    @classmethod
    def _absolute_textfile(cls, value: Path | None) -> Path | None:
        return absolute_path(value, "metrics.textfile")
