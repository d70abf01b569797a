"""dmem-libvirt: run libvirt/KVM guests on reserved host memory.

The package is imported by the libvirt hook on every guest operation, so this
file imports nothing: each module pulls in only what it needs.
"""

__version__ = "0.1.0"
