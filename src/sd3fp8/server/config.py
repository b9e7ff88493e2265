"""Server configuration: one frozen object, built by the CLI (or a test) and passed in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sd3fp8.errors import ConfigError

MB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Where files live, who may connect, and the limits.

    ``temp`` is wiped and recreated at startup (PreviewImage's files, like ComfyUI's temp/).
    ``user`` holds the frontend's settings and saved workflows (ComfyUI's user/default/).
    ``frontend`` is the static folder of the web UI, or None to serve the API only."""

    output: Path
    input: Path
    temp: Path
    user: Path
    host: str = "127.0.0.1"
    port: int = 8188
    token: str | None = None
    max_queue: int = 100  # pending prompts; more are refused with 429
    max_history: int = 10000  # ComfyUI's MAXIMUM_HISTORY_SIZE
    max_upload_size: int = 100 * MB  # ComfyUI's --max-upload-size default; bounds every request body
    frontend: Path | None = None
    previews: bool = True  # latent previews unless a prompt's extra_data.preview_method says "none"

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.max_queue < 1 or self.max_history < 1:
            raise ConfigError("max_queue and max_history must be at least 1")
        if self.max_upload_size < 1024:
            raise ConfigError(f"max_upload_size must be at least 1 KiB, got {self.max_upload_size}")
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("a token must have at least 8 characters")
        if self.frontend is not None and not (Path(self.frontend) / "index.html").is_file():
            raise ConfigError(f"no index.html in the frontend folder {self.frontend}")

    @classmethod
    def under(cls, root: Path, **kwargs) -> ServerConfig:
        """Folders output/, input/, temp/, user/ under ``root`` (tests, quick starts)."""
        root = Path(root)
        return cls(output=root / "output", input=root / "input", temp=root / "temp", user=root / "user", **kwargs)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def installed_frontend() -> Path | None:
    """The static folder of the `comfyui-frontend-package` pip package, if installed."""
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    static = Path(comfyui_frontend_package.__file__).parent / "static"
    return static if (static / "index.html").is_file() else None
