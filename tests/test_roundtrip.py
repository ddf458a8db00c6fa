"""Property test: any valid host view written by Python reads back exactly
through the C reader (the NSS entry points)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from step_ssh.cache.writer import build, effective_groups, publish_bytes
from step_ssh.native import NssClient, principals
from step_ssh.view import HostView

names = st.from_regex(r"[a-z_][a-z0-9_-]{0,14}", fullmatch=True)
text = st.text(st.characters(blacklist_characters=":\n\r\x00", blacklist_categories=("Cs",)), max_size=40)
paths = st.from_regex(r"/[a-zA-Z0-9_./-]{0,30}", fullmatch=True)
principal = st.from_regex(r"[a-zA-Z0-9@._+=-]{1,30}", fullmatch=True)
ids = st.integers(min_value=1000, max_value=2**32 - 2)


@st.composite
def views(draw):
    unames = draw(st.lists(names.filter(lambda n: n not in ("step-sudo", "step-jump")), unique=True, max_size=25))
    uids = draw(st.lists(ids, unique=True, min_size=len(unames), max_size=len(unames)))
    # (step-sudo / 69999 and step-jump / 69998 are the synthesized groups)
    gnames = draw(st.lists(names.filter(lambda n: n not in unames and n not in ("step-sudo", "step-jump")),
                           unique=True, max_size=15))
    gids = draw(st.lists(ids.filter(lambda g: g not in (69998, 69999)), unique=True, min_size=len(gnames),
                         max_size=len(gnames)))
    users = []
    for n, u in zip(unames, uids):
        gid = draw(st.sampled_from(gids)) if gids and draw(st.booleans()) else u
        if gid in (69998, 69999):
            gid = u
        users.append({"name": n, "uid": u, "gid": gid, "gecos": draw(text), "home": draw(paths),
                      "shell": draw(paths), "principals": draw(st.lists(principal, max_size=4)),
                      "access": draw(st.sampled_from(["ssh", "sudo", "none", "jump"]))})
    groups = [{"name": n, "gid": g, "members": draw(st.lists(st.sampled_from(unames), unique=True)) if unames else []}
              for n, g in zip(gnames, gids)]
    # a user-private group name must not collide with a directory group
    taken = {g["gid"] for g in groups} | {69998, 69999}
    if any(u["gid"] not in taken and u["name"] in gnames for u in users):
        groups = []
        for u in users:
            u["gid"] = u["uid"]
    return HostView.model_validate({"users": users, "groups": groups,
                                    "revision": draw(st.integers(0, 2**63 - 1)),
                                    "bastion": draw(st.booleans())})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(views())
def test_roundtrip(view):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "cache"
        publish_bytes(build(view), path)
        c = NssClient(path, bufsize=16)
        for u in view.users:
            for pw in (c.getpwnam(u.name), c.getpwuid(u.uid)):
                assert pw is not None
                assert (pw.name, pw.uid, pw.gid, pw.gecos, pw.home, pw.shell) == (
                    u.name, u.uid, u.gid, u.gecos, u.home_dir, u.shell)
        groups = effective_groups(view)
        for g in groups:
            for gr in (c.getgrnam(g.name), c.getgrgid(g.gid)):
                assert gr is not None and (gr.name, gr.gid, list(gr.members)) == (g.name, g.gid, g.members)
        assert [p.name for p in c.passwd_entries()] == [u.name for u in view.users]
        assert [g.name for g in c.group_entries()] == [g.name for g in groups]
        for u in view.users:
            expect = [g.gid for g in groups if u.name in g.members and g.gid != u.gid]
            assert c.initgroups(u.name, u.gid) == list(dict.fromkeys(expect))
        # every primary gid resolves to a group
        for u in view.users:
            assert c.getgrgid(u.gid) is not None
            assert principals(path, u.name) == u.principals
        assert c.getpwnam("no-such-user-x") is None
        assert principals(path, "no-such-user-x") is None
