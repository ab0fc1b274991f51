"""cage: one microVM per agent from its AGENT.toml (QEMU microvm, or libkrun where it and KVM are usable)."""
