"""The Terraform example's cloud-init template renders to valid cloud-config
that carries the enrollment commands."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

TEMPLATE = Path(__file__).resolve().parent.parent / "docs/terraform/cloud-init.yaml.tftpl"


def render(text: str, values: dict[str, str]) -> str:
    """Terraform templatefile() semantics for what the template uses:
    ${name} interpolation and $${ as a literal ${. Unknown names are errors,
    as in Terraform."""
    def sub(m: re.Match) -> str:
        if m.group(1):
            return "${"
        name = m.group(2).strip()
        if name not in values:
            raise KeyError(f"template uses undefined variable {name!r}")
        return values[name]
    assert "%{" not in text, "template directives are not supported by this renderer"
    return re.sub(r"(\$\$\{)|\$\{([^}]*)\}", sub, text)


VALUES = {
    "server": "cp.example.internal:8443",
    "fingerprint": "SHA256:abcDEF123",
    "token": "tok-secret-123",
    "hostname": "web1",
    "tag_args": "--tag=env=prod --tag=role=web",
    "bastion_arg": "",
    "pip_spec": "step-ssh==0.1.0",
}


def test_renders_to_cloud_config_with_enrollment():
    text = render(TEMPLATE.read_text(), VALUES)
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert "openssh-server" in doc["packages"]
    env = doc["write_files"][0]
    assert env["permissions"] == "0600" and "STEP_SSH_TOKEN=tok-secret-123" in env["content"]
    cmds = [" ".join(c) if isinstance(c, list) else c for c in doc["runcmd"]]
    activate = next(c for c in cmds if "step-ssh activate" in c)
    for part in ("--server 'cp.example.internal:8443'", "--fingerprint 'SHA256:abcDEF123'",
                 "--hostname 'web1'", "--tag=env=prod", "--tag=role=web"):
        assert part in activate
    # the token never appears on a command line (it would show in ps)
    assert all("tok-secret-123" not in c for c in cmds)
    assert any("rm -f /run/step-ssh-enroll.env" in c for c in cmds)


def test_bastion_flag_and_undefined_variables():
    text = render(TEMPLATE.read_text(), {**VALUES, "bastion_arg": "--is-bastion"})
    assert "--is-bastion" in text
    missing = dict(VALUES)
    del missing["token"]
    try:
        render(TEMPLATE.read_text(), missing)
    except KeyError as e:
        assert "token" in str(e)
    else:
        raise AssertionError("an undefined template variable must fail")
