"""The step-ssh agent: keeps this host's cache true to the control plane.

- ``config``: the YAML configuration (pydantic, errors name the bad key);
- ``identity``: enrollment, the built-in identity (renewed at 2/3 of its
  lifetime) and the *files* identity (reloaded when the files change);
- ``sync``: the Watch loop, applying snapshots and deltas, publishing caches;
- ``publish``: turning a wire view into a cache without shadowing local accounts;
- ``tlsdiag``: TLS and gRPC failures in words an operator can act on;
- ``status``: the state file ``step-ssh status`` reads;
- ``notify``: systemd's sd_notify protocol.

See docs/agent.md.
"""
