"""The host's local cache: model -> validated -> file that the C modules read."""
from step_ssh.cache.local import LocalAccounts, ViewRejected, check_against_local
from step_ssh.cache.writer import build, publish_bytes, write_cache

__all__ = ["LocalAccounts", "ViewRejected", "build", "check_against_local", "publish_bytes", "write_cache"]
