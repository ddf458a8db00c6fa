"""step-ssh: host-side SSH access enforcement."""
__version__ = "0.1.0"
