"""`sd3fp8 serve`: ComfyUI's HTTP + WebSocket API over the workflow executor, so the ComfyUI web UI,
its script examples, Open WebUI and SillyTavern drive sd3fp8 unchanged.

Modules: ``config`` (ServerConfig), ``app`` (the FastAPI factory and shared state), ``jobs`` (queue
and history), ``worker`` (the thread that runs prompts), ``hub`` (WebSocket fan-out), ``protocol``
(binary frames), ``security`` (origin, token, body limits), ``routes_*`` (the API), ``frontend``
(static UI and templates), ``inventory`` (a ComfyUI models tree), ``run`` (uvicorn).
"""

from sd3fp8.server.app import create_app
from sd3fp8.server.config import ServerConfig, installed_frontend
from sd3fp8.server.run import make_server, serve

__all__ = ["ServerConfig", "create_app", "installed_frontend", "make_server", "serve"]
