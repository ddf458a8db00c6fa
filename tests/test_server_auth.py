"""Identity is the client certificate (DESIGN.md invariant 5): host
certificates cannot call admin RPCs, foreign-CA and forged certificates are
refused, removed/renewed/re-enrolled hosts' old certificates are revoked,
enrollment tokens are one-time, and the audit report is idempotent."""
from __future__ import annotations

import datetime as dt
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from server_fixtures import module_server  # noqa: F401

from step_ssh import pki, rpc
from step_ssh.proto import stepssh_pb2 as pb
from step_ssh.proto import stepssh_pb2_grpc as pbg


def stubs(s, key: bytes, cert: bytes, ca: bytes = None):
    ch = rpc.channel(s.address, rpc.mtls_credentials(ca or s.ca_pem, cert, key))
    return ch, pbg.AdminServiceStub(ch), pbg.HostServiceStub(ch)


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details() or ""


ADMIN_CALLS = [
    ("ListUsers", pb.Empty()),
    ("CreateUser", pb.DirectoryUser(name="mallory")),
    ("AddGrant", pb.Grant(group="devs", tags={"env": "prod"}, access=pb.ACCESS_SUDO)),
    ("CreateEnrollToken", pb.TokenRequest(hostname="evil")),
    ("SignUserKey", pb.SignRequest(user="alice", public_key="x")),
    ("ListAudit", pb.AuditQuery()),
    ("DeleteHost", pb.NameRef(name="x")),
]


def test_host_certificate_cannot_call_admin_rpcs(module_server):
    s = module_server
    h = s.enroll("h-admin-test", {"env": "prod"})
    before = s.db_dump()
    admin = h.admin_stub()
    for method, req in ADMIN_CALLS:
        code, details = code_of(lambda: getattr(admin, method)(req, timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
        assert "host certificate" in details
    assert s.db_dump() == before


def test_admin_certificate_cannot_act_as_a_host(module_server):
    s = module_server
    ch = rpc.channel(s.address, s.admin_creds())
    host = pbg.HostServiceStub(ch)
    code, details = code_of(lambda: host.Register(pb.RegisterRequest(hostname="x"), timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "for hosts" in details
    code, _ = code_of(lambda: next(host.Watch(pb.WatchRequest(), timeout=10)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    ch.close()


def test_bootstrap_identity_may_only_enroll(module_server):
    s = module_server
    ch = rpc.channel(s.address, rpc.enroll_credentials(s.ca_pem))
    code, details = code_of(lambda: pbg.AdminServiceStub(ch).ListUsers(pb.Empty(), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not issued by this control plane" in details
    code, details = code_of(lambda: pbg.HostServiceStub(ch).Register(pb.RegisterRequest(), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, details = code_of(lambda: next(pbg.HostServiceStub(ch).Watch(pb.WatchRequest(), timeout=10)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    ch.close()


def test_forged_certificate_under_the_public_bootstrap_ca_is_anonymous(module_server):
    """Anyone can mint certificates under the bootstrap CA; one claiming to be
    an admin (or an existing host) must identify nobody."""
    s = module_server
    h = s.enroll("h-forge-target", {"env": "prod"})
    ca_key = pki._bootstrap_ca_key()
    for uri in (pki.admin_uri("admin"), pki.host_uri(h.id)):
        key = pki.new_private_key()
        t = pki.now()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, pki.BOOTSTRAP_CN)]))
                .public_key(pki.load_key(key).public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(t - dt.timedelta(minutes=1)).not_valid_after(t + dt.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        ch, admin, host = stubs(s, key, pki.cert_pem(cert))
        code, _ = code_of(lambda: admin.ListUsers(pb.Empty(), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = code_of(lambda: host.Register(pb.RegisterRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        ch.close()


def test_foreign_ca_and_missing_client_certificate_are_refused(module_server):
    s = module_server
    h = s.enroll("h-foreign", {"env": "prod"})
    other_ca, other_key = pki.create_ca("someone else's CA")
    for uri in (pki.host_uri(h.id), pki.admin_uri("admin")):
        key = pki.new_private_key()
        cert = pki.issue(other_ca, other_key, pki.load_key(key).public_key(), "x", [uri])
        ch, admin, host = stubs(s, key, cert)
        with pytest.raises(grpc.RpcError) as e:
            admin.ListUsers(pb.Empty(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake itself fails
        p = rpc.explain(e.value, s.address)
        assert p.exit_code == rpc.EXIT_AUTH and "rejected the client certificate" in p.message, p
        ch.close()
    # no client certificate at all
    ch = rpc.channel(s.address, grpc.ssl_channel_credentials(root_certificates=s.ca_pem))
    code, _ = code_of(lambda: pbg.AdminServiceStub(ch).ListUsers(pb.Empty(), timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE
    ch.close()


def test_removed_host_certificate_is_revoked(module_server):
    s = module_server
    h = s.enroll("h-removed", {"env": "prod"})
    h.register(tags={"env": "prod"})
    s.admin.DeleteHost(pb.NameRef(name="h-removed"), timeout=10)
    code, details = code_of(lambda: h.register(tags={"env": "prod"}))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "removed" in details
    code, _ = code_of(lambda: next(h.watch(0)))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_renewal_and_reenrollment_revoke_the_old_certificate(module_server):
    s = module_server
    h = s.enroll("h-renew", {"env": "prod"})
    i = h.identity
    old = ((i / "host.key").read_bytes(), (i / "host.crt").read_bytes())
    new_pem = h.renew()
    cert = pki.load_cert(new_pem)
    assert pki.identity_of(cert) == ("host", h.id)
    assert h.register(tags={"env": "prod"}).certificate_serial == pki.serial_hex(cert)
    ch, _, host = stubs(s, *old)
    code, details = code_of(lambda: host.Register(pb.RegisterRequest(), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "no longer valid" in details
    ch.close()
    # the machine is rebuilt and enrolled again under the same name: same id, the old key is out
    again = s.enroll("h-renew", {"env": "prod"}, config_dir=s.base / "hosts" / "h-renew-2")
    assert again.id == h.id
    code, _ = code_of(lambda: h.register(tags={"env": "prod"}))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert again.register(tags={"env": "prod"}).hostname == "h-renew"


def test_expired_host_certificate_is_refused(module_server):
    s = module_server
    h = s.enroll("h-expired", {"env": "prod"})
    key = pki.new_private_key()
    ca_key = (s.dir / "ca.key").read_bytes()
    cert = pki.issue(s.ca_pem, ca_key, pki.load_key(key).public_key(), "h-expired", [pki.host_uri(h.id)],
                     not_before=pki.now() - dt.timedelta(days=2), lifetime=dt.timedelta(days=1))
    problems = rpc.check_identity(s.ca_pem, cert, key)
    assert any("expired" in p for p in problems)
    ch, _, host = stubs(s, key, cert)
    code, _ = code_of(lambda: host.Register(pb.RegisterRequest(), timeout=10))
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    ch.close()


def test_enrollment_tokens_are_one_time_and_expire(module_server):
    s = module_server
    tok = s.token("h-token", {"env": "prod"})
    key = pki.new_private_key()
    r = s.enroll_raw(tok, key, "h-token")
    assert r.hostname == "h-token" and dict(r.tags) == {"env": "prod"} and r.ca_pem == s.ca_pem
    cert = pki.load_cert(r.certificate_pem)
    assert pki.identity_of(cert) == ("host", r.host_id)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(hours=24)
    before = s.db_dump()
    code, details = code_of(lambda: s.enroll_raw(tok, pki.new_private_key()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "already used" in details
    code, details = code_of(lambda: s.enroll_raw("sst_nonsense", pki.new_private_key()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown enrollment token" in details
    assert s.db_dump() == before
    short = s.token("h-short", ttl=1)
    time.sleep(1.2)
    before = s.db_dump()
    code, details = code_of(lambda: s.enroll_raw(short, pki.new_private_key()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "expired" in details
    assert s.db_dump() == before
    good = s.token("h-csr")
    before = s.db_dump()
    ch = rpc.channel(s.address, rpc.enroll_credentials(s.ca_pem))
    code, details = code_of(lambda: pbg.HostServiceStub(ch).Enroll(
        pb.EnrollRequest(token=good, csr_pem=b"not a csr"), timeout=10))
    ch.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "CSR" in details
    assert s.db_dump() == before  # the token is still unused


def test_pinning_the_ca_by_fingerprint(module_server):
    s = module_server
    assert rpc.fetch_ca(s.address, s.fingerprint) == s.ca_pem
    with pytest.raises(ValueError, match="no CA certificate with fingerprint"):
        rpc.fetch_ca(s.address, "SHA256:" + "A" * 43)


def test_report_audit_is_idempotent(module_server):
    s = module_server
    h = s.enroll("h-audit", {"env": "prod"})
    evs = [pb.AuditEvent(id=f"01HZAUDIT{i:017d}", type="session_open", user="alice", result="success",
                         time_us=int(time.time() * 1e6) + i) for i in range(3)]
    r1 = h.stub.ReportAudit(pb.ReportAuditRequest(events=evs), timeout=10)
    r2 = h.stub.ReportAudit(pb.ReportAuditRequest(events=evs + [pb.AuditEvent(type="no id")]), timeout=10)
    assert list(r1.acknowledged_ids) == [e.id for e in evs] == list(r2.acknowledged_ids)
    got = s.admin.ListAudit(pb.AuditQuery(host="h-audit"), timeout=10).events
    assert [e.id for e in got] == [e.id for e in evs]
    assert all(e.host_id == h.id and e.hostname == "h-audit" and e.received_us > 0 for e in got)
    assert len(s.admin.ListAudit(pb.AuditQuery(user="alice", type="session_open"), timeout=10).events) == 3


def test_tail_audit_streams_new_events(module_server):
    import threading
    s = module_server
    h = s.enroll("h-tail", {"env": "prod"})
    call = s.admin.TailAudit(pb.AuditQuery(host="h-tail"), timeout=20)
    got = []

    def read():
        for ev in call:
            got.append(ev)
            if len(got) == 2:
                call.cancel()
                return
    t = threading.Thread(target=read, daemon=True)
    t.start()
    time.sleep(0.3)
    now = int(time.time() * 1e6)
    h.stub.ReportAudit(pb.ReportAuditRequest(events=[
        pb.AuditEvent(id="01HZTAIL0000000000000000001", type="sudo", user="al", time_us=now),
        pb.AuditEvent(id="01HZTAIL0000000000000000002", type="session_open", user="al", time_us=now + 1)]),
        timeout=10)
    t.join(10)
    assert [e.id for e in got] == ["01HZTAIL0000000000000000001", "01HZTAIL0000000000000000002"]
    assert all(e.hostname == "h-tail" for e in got)
