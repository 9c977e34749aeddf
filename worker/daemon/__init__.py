"""The worker process: its main loop (`worker.Worker`), start-up and shutdown, its settings, the
alarm it sleeps on and its conversation with systemd."""
