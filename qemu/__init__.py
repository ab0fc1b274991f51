"""Boot the appliance under QEMU: qemu/run (see qemu/runner.py)."""
