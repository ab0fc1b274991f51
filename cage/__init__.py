"""cage: one microVM per agent described by an AGENT.toml (issue 6; nothing here yet)."""
