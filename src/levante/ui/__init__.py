"""Browser chat UI (Gradio), mounted on the server at /ui; a client of the server's own HTTP API."""

from levante.ui.chat import UI_PATH, build_ui, mount_ui

__all__ = ["UI_PATH", "build_ui", "mount_ui"]
