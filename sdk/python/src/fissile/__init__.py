"""Fissile: persistent Python REPLs in microVMs that fork, merge, roll back and persist.

```python
from fissile import Sandbox

with Sandbox() as sb:                      # FISSILE_API_KEY / FISSILE_API_URL
    sb.run_code("import pandas as pd; df = pd.DataFrame({'a': [1, 2]})")
    print(sb.run_code("df.a.sum()").text)  # 3: state persists between calls
```
"""

from ._async import AsyncCommands, AsyncFiles, AsyncSandbox, AsyncTemplates
from ._errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    FissileError,
    ForkError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    SandboxError,
    TemplateBuildError,
    TimeoutError,
)
from ._models import (
    CommandResult,
    EntryInfo,
    Execution,
    ExecutionError,
    Logs,
    NetworkCounters,
    NetworkPolicy,
    Result,
    SandboxInfo,
    SpaceInfo,
    TemplateInfo,
    TemplateShape,
)
from ._sync import Commands, Files, Sandbox, Templates

__version__ = "0.1.0"

__all__ = [
    "AsyncCommands",
    "AsyncFiles",
    "AsyncSandbox",
    "AsyncTemplates",
    "AuthenticationError",
    "BadRequestError",
    "CommandResult",
    "Commands",
    "ConflictError",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "Files",
    "FissileError",
    "ForkError",
    "Logs",
    "NetworkCounters",
    "NetworkPolicy",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "Result",
    "Sandbox",
    "SandboxError",
    "SandboxInfo",
    "SpaceInfo",
    "TemplateBuildError",
    "TemplateInfo",
    "TemplateShape",
    "Templates",
    "TimeoutError",
    "__version__",
]
