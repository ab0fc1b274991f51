"""egress: the default-deny network controller (issue 5; nothing here yet)."""
