"""stt-admin: a Textual console for a running stt-server, over its control socket."""
