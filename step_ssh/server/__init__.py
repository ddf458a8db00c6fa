"""step-ssh-server: the control plane (docs/control-plane.md)."""
