"""Account-name and id rules shared by the models, the agent and the control plane.

Kept free of pydantic so the agent's hot path (which validates views record by
record in wire form, docs/agent.md) does not load the view models it never uses.
"""
from __future__ import annotations

import re

# Debian's useradd default (shadow's is_valid_user_name without --badname):
# lower-case start, then lower-case, digits, '_' or '-', optional trailing '$'.
NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]*\$?$")
NAME_MAX = 32
MAX_ID = 2**32 - 2  # (uid_t)-1 is "no change" to chown and never a valid id
DEFAULT_MIN_ID = 1000
DEFAULT_MAX_STALE = 24 * 3600
PRINCIPAL_RE = re.compile(r"^[^\s,\x00-\x1f\x7f]{1,256}$")
DEFAULT_SUDO_GROUP = "step-sudo"
DEFAULT_SUDO_GID = 69999
# On a bastion, jump-only users are members of this synthesized group, which
# the sshd drop-in's `Match Group` confines to local forwarding (docs/login.md).
JUMP_GROUP = "step-jump"
JUMP_GID = 69998
