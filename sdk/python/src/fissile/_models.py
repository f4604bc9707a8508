"""What the API returns, as typed values (pydantic v2)."""

from __future__ import annotations

import base64
from typing import Any

from pydantic import BaseModel, Field

_SHORT = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "text/latex": "latex",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/svg+xml": "svg",
    "application/json": "json",
    "application/javascript": "javascript",
}


class Result(BaseModel):
    """A rich result of a cell: the value of its last expression (`is_main_result`) or an
    object it displayed (e.g. a matplotlib figure). Binary formats are base64 strings."""

    data: dict[str, Any] = Field(default_factory=dict)
    is_main_result: bool = False

    @property
    def text(self) -> str | None:
        """`text/plain`: the value's repr."""
        v = self.data.get("text/plain")
        return v if isinstance(v, str) else None

    @property
    def html(self) -> str | None:
        """`text/html`, when the object has `_repr_html_` (e.g. a DataFrame)."""
        v = self.data.get("text/html")
        return v if isinstance(v, str) else None

    @property
    def markdown(self) -> str | None:
        """`text/markdown`."""
        v = self.data.get("text/markdown")
        return v if isinstance(v, str) else None

    @property
    def png(self) -> str | None:
        """`image/png`, base64."""
        v = self.data.get("image/png")
        return v if isinstance(v, str) else None

    @property
    def jpeg(self) -> str | None:
        """`image/jpeg`, base64."""
        v = self.data.get("image/jpeg")
        return v if isinstance(v, str) else None

    @property
    def svg(self) -> str | None:
        """`image/svg+xml`."""
        v = self.data.get("image/svg+xml")
        return v if isinstance(v, str) else None

    @property
    def json(self) -> Any:
        """`application/json`, parsed."""
        return self.data.get("application/json")

    def png_bytes(self) -> bytes | None:
        """`image/png` decoded."""
        return base64.b64decode(self.png) if self.png else None

    def formats(self) -> list[str]:
        """The formats present, by short name (`text`, `html`, `png`, ...)."""
        return [_SHORT.get(m, m) for m in self.data]


class Logs(BaseModel):
    """What a cell wrote, chunk by chunk as it arrived."""

    stdout: list[str] = Field(default_factory=list)
    stderr: list[str] = Field(default_factory=list)


class ExecutionError(BaseModel):
    """The exception a cell raised."""

    name: str
    value: str
    traceback: list[str] = Field(default_factory=list)

    @property
    def traceback_text(self) -> str:
        """The traceback as one string."""
        return "\n".join(self.traceback)


class Execution(BaseModel):
    """Everything one cell produced, in order."""

    results: list[Result] = Field(default_factory=list)
    logs: Logs = Field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int = 0
    duration_ms: float = 0.0
    """Run time measured in the guest."""
    server_ms: float = 0.0
    """Time in the daemon, request to the end of the cell."""
    timed_out: bool = False
    """The cell's time limit passed and it was interrupted (the REPL kept its state)."""
    state_lost: bool = False
    """The interpreter had to be restarted: earlier variables and imports are gone."""

    @property
    def text(self) -> str | None:
        """The main result's `text/plain` (the value of the last expression), if any."""
        for r in self.results:
            if r.is_main_result:
                return r.text
        return None


class CommandResult(BaseModel):
    """A finished command."""

    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    """`None` if a signal killed it."""
    signal: int | None = None
    timed_out: bool = False
    duration_ms: float = 0.0


class EntryInfo(BaseModel):
    """One entry of a directory listing."""

    name: str
    kind: str
    """`file`, `dir`, `symlink` or `other`."""
    size: int
    mode: int
    modified_at_ms: int


class NetworkPolicy(BaseModel):
    """What a sandbox's guest may reach. The host's own addresses, loopback, link-local
    (cloud metadata) and other sandboxes are out of reach whatever it says; then `deny` is
    checked, then `allow` (when not empty), else `internet`.

    Names: the guest's resolver answers only names the policy allows, and while it names
    domains, HTTP (port 80) and TLS (port 443) connections are checked by the name they are
    for (Host, SNI) at a proxy that resolves the name itself, so a denied domain cannot be
    reached by its address either."""

    internet: bool = True
    """Reach anything not denied, when `allow` is empty. Off: only `allow`."""
    allow: list[str] = Field(default_factory=list)
    """Only these IPv4 addresses or networks (`"203.0.113.0/24"`), when not empty."""
    deny: list[str] = Field(default_factory=list)
    """Never these."""
    allow_domains: list[str] = Field(default_factory=list)
    """These names resolve and HTTP/TLS connections for them pass, whatever `internet` and
    `allow` say (`"example.com"`: it and every name under it; `"*.example.com"`: only the
    names under it). When not empty, no other name resolves."""
    deny_domains: list[str] = Field(default_factory=list)
    """These names never resolve, and no HTTP/TLS connection may be for them."""


class NetworkCounters(BaseModel):
    """What a sandbox's network rules counted since it got its way out."""

    blocked_connections: int = 0
    """New connections its policy rejected."""
    connection_cap_hits: int = 0
    """New connections rejected because the daemon's connection cap was reached."""
    rate_dropped_packets: int = 0
    """Packets dropped over the daemon's bandwidth cap."""
    rate_dropped_bytes: int = 0
    """Their bytes."""


class SandboxInfo(BaseModel):
    """A sandbox as the daemon reports it."""

    id: str
    space_id: str | None = None
    template: str
    state: str
    """`starting`, `running` or `lost`."""
    created_at_ms: int
    memory_mib: int
    vcpus: int
    idle_timeout_s: int | None = None
    max_lifetime_s: int | None = None
    """Its own lifetime limit (its tenant's or the daemon's may be shorter)."""
    metadata: dict[str, str] = Field(default_factory=dict)
    network: NetworkPolicy | None = None
    """Its egress policy (`None`: it reaches nothing outside its sandbox)."""


class SpaceInfo(BaseModel):
    """A persistent space."""

    space_id: str
    sandbox_id: str | None = None
    state: str
    """`running`, `persisted`, `empty` or `lost`."""
    template: str
    memory_mib: int
    created_at_ms: int
    persisted_at_ms: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class TemplateShape(BaseModel):
    """One ready shape of a template: its snapshot's state and its warm pool."""

    memory_mib: int
    vcpus: int
    snapshot: dict[str, Any] | None = None
    """`{"status": "ready", "build_ms", "created_ms"}`, `building`, `failed` or `None`."""
    warm: int = 0

    @property
    def ready(self) -> bool:
        """Creates of this shape restore the template's snapshot."""
        return bool(self.snapshot and self.snapshot.get("status") == "ready")


class TemplateInfo(BaseModel):
    """A template: the daemon's own (`base` is `None`) or one built from a spec."""

    name: str
    base: str | None = None
    ready: list[TemplateShape] = Field(default_factory=list)
