"""nulld: NullBox's PID 1 and service supervisor (issue 3; nothing here yet)."""
