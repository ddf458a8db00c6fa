"""SCIM models: the core User and Group of RFC 7643 (from scim2-models), the
enterprise extension (accepted and stored, as IdPs send it), and step-ssh's
POSIX extensions (docs/scim.md, "Extension schema")."""
from __future__ import annotations

from typing import Annotated, Any

from scim2_models import (URN, AuthenticationScheme, Bulk, ChangePassword, EnterpriseUser, ETag, Extension,
                          Filter, Group, Mutability, Patch, ResourceType, ScimPolicy, ScimProvider,
                          ServiceProviderConfig, Sort, User)

USER_EXT_URN = "urn:ietf:params:scim:schemas:extension:stepssh:2.0:User"
GROUP_EXT_URN = "urn:ietf:params:scim:schemas:extension:stepssh:2.0:Group"
USER_URN = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_URN = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE_URN = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
ERROR_URN = "urn:ietf:params:scim:api:messages:2.0:Error"
LIST_URN = "urn:ietf:params:scim:api:messages:2.0:ListResponse"

MAX_RESULTS = 1000            # the most resources one list response carries
MAX_PAYLOAD = 4 * 1024 * 1024  # request bodies larger than this get 413
MAX_OPERATIONS = 1000         # PATCH operations in one request


class StepSSHUser(Extension):
    """POSIX account attributes step-ssh gives the user on hosts."""

    __schema__ = URN(USER_EXT_URN)

    login_name: Annotated[str | None, Mutability.immutable] = None
    """The account name on hosts (useradd rules). Derived from userName when left out; never changes."""

    uid_number: Annotated[int | None, Mutability.immutable] = None
    """The uid on every host. Allocated when left out; never changes once assigned."""

    gid_number: int | None = None
    """The primary gid: a group's gid, or a private group's (allocated when left out)."""

    login_shell: str | None = None
    """Absolute path of the login shell (default /bin/bash)."""

    home_directory: str | None = None
    """Absolute path of the home directory (default /home/LOGINNAME)."""

    ssh_principals: list[str] | None = None
    """Principals of SSH user certificates that may log in as this account (default: loginName)."""


class StepSSHGroup(Extension):
    """POSIX group attributes step-ssh gives the group on hosts."""

    __schema__ = URN(GROUP_EXT_URN)

    group_name: Annotated[str | None, Mutability.immutable] = None
    """The group name on hosts (useradd rules). Derived from displayName when left out; never changes."""

    gid_number: Annotated[int | None, Mutability.immutable] = None
    """The gid on every host. Allocated when left out; never changes once assigned."""


UserModel = User[EnterpriseUser | StepSSHUser]
GroupModel = Group[StepSSHGroup]

# What real IdPs send, tolerated: attributes this service does not know are
# dropped (Okta and Entra send their own extension URNs), a remove may name
# the members it removes in its value (Entra, Okta), and an add/replace on a
# value path that matches nothing creates the entry (Entra).
POLICY = ScimPolicy(unknown=ScimPolicy.Unknown.ignore,
                    remove_value_as_filter=ScimPolicy.RemoveValue.apply,
                    unmatched_path_filter=ScimPolicy.UnmatchedPathFilter.create)

USER_TYPE = ResourceType.from_resource(UserModel)
GROUP_TYPE = ResourceType.from_resource(GroupModel)
USER_TYPE.description = "A person with an account on hosts"
GROUP_TYPE.description = "A group; grants give its members ssh or sudo on tagged hosts"

CONFIG = ServiceProviderConfig(
    documentation_uri=None,
    patch=Patch(supported=True),
    bulk=Bulk(supported=False, max_operations=0, max_payload_size=0),
    filter=Filter(supported=True, max_results=MAX_RESULTS),
    change_password=ChangePassword(supported=False),
    sort=Sort(supported=False),
    etag=ETag(supported=False),
    authentication_schemes=[AuthenticationScheme(
        type="oauthbearertoken", name="OAuth Bearer Token", primary=True,
        description="A token from `step-ssh-ctl scim token create`, sent as 'Authorization: Bearer TOKEN'")],
)

PROVIDER = ScimProvider(models=[User, EnterpriseUser, StepSSHUser, Group, StepSSHGroup],
                        resource_types=[USER_TYPE, GROUP_TYPE], config=CONFIG, policy=POLICY)


def schema_docs() -> list[dict[str, Any]]:
    from scim2_models import Context
    return [s.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE) for s in PROVIDER.schemas]
