"""SCIM 2.0 (RFC 7643/7644) on the control plane: the IdP provisions users and
groups, which become accounts and groups like any other (docs/scim.md).

- schema: the models (scim2-models) and the step-ssh extension URNs;
- names: userName/displayName -> POSIX name rule;
- query: SCIM filters -> SQL;
- directory: resources over the store (DB thread), bearer tokens;
- http: the HTTPS endpoint (Starlette on uvicorn, same event loop as gRPC).
"""
