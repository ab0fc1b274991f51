"""The NullBox kernels: Debian's linux-source-6.1 built with no loadable modules, for the appliance and for agent VMs.

kernel/appliance.config and kernel/guest.config are fragments applied over ``tinyconfig``; kernel.build builds
them into build/kernel-nullbox/<variant>/.  See docs/kernel.md.
"""
