"""Background services, each a `base.Service` or `base.SessionService`: heartbeat, leadership,
the rescuer, the pruner, the listener and the real-time sources."""
