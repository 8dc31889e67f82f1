"""Management listener: health endpoint now, web UI and REST API later."""
