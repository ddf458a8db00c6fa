"""The host's local cache: model -> validated -> file that the C modules read.

format: the layout; writer: build from a HostView and publish; lean: the agent's
streaming builder; local: the host's own accounts, which always win.
"""
