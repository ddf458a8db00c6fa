"""SCIM filters (parsed and checked by scim2-models) -> SQL over the store.

`SearchRequest[Model]` parses the filter and refuses unknown attributes and
values of the wrong type (400 invalidFilter). The tree it yields is walked
here into one SQL condition, so a filter over 100k users is an indexed or
at worst a single-pass query, never a Python loop over resources.

Where attributes live:
- id, externalId, userName / displayName, meta.created / meta.lastModified:
  columns of scim_users / scim_groups (userName and displayName through their
  case-folded key columns);
- active and the step-ssh extension: columns of `users` / `groups`, which
  stay the source of truth for what hosts see;
- Group.members and User.groups: the `members` table;
- every other attribute: the SCIM document stored in the `data` column
  (JSON), multi-valued ones through json_each.

String comparisons fold case (Unicode NFC + lower-case, the scim2-models
default) unless the attribute is caseExact, as RFC 7644 §3.4.2.2 asks.
"""
from __future__ import annotations

import datetime as dt
import unicodedata
from dataclasses import dataclass
from typing import Any, Optional

from scim2_models import CaseExact, InvalidFilterException
from scim2_models.path import (AttrPath, CompareOperator, Comparison, FilterNode, FilterVisitor, LogicalExpr,
                               LogicalOperator, Not, Present, ValuePath)

from step_ssh.server.scim import schema as S


def fold(value: Optional[str]) -> Optional[str]:
    """The form strings are compared in (also registered as SQL scim_fold())."""
    if value is None:
        return None
    if not isinstance(value, str):
        return value
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", value).lower())


def iso(ts: dt.datetime) -> str:
    """Timestamps as stored and returned: UTC, microseconds, 'Z'."""
    return ts.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json_key(name: str) -> str:
    return '"' + name.replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Operand:
    sql: str
    type: str = "string"     # SCIM attribute type
    fold: bool = True        # compare case-insensitively
    prefolded: bool = False  # sql already yields the folded form


class Collection:
    """A multi-valued attribute: `EXISTS (... WHERE cond)` over its values."""

    def exists(self, alias: str, cond: str) -> str:
        raise NotImplementedError

    def item(self, alias: str, sub: Optional[str]) -> Optional[Operand]:
        """The operand for sub-attribute `sub` (None: the value itself)."""
        raise NotImplementedError


class JsonCollection(Collection):
    def __init__(self, source: str, attr=None):
        self.source = source  # arguments of json_each()
        self.attr = attr      # scim2_models Attribute (for sub-attribute types), None: simple strings

    def exists(self, alias: str, cond: str) -> str:
        return f"EXISTS (SELECT 1 FROM json_each({self.source}) AS {alias} WHERE {cond})"

    def item(self, alias: str, sub: Optional[str]) -> Optional[Operand]:
        subs = {a.name.lower(): a for a in (self.attr.sub_attributes or [])} if self.attr is not None else {}
        if not subs:
            t, ce = ("string", False) if self.attr is None else (_type(self.attr), _exact(self.attr))
            return Operand(f"{alias}.value", t, not ce)
        a = subs.get((sub or "value").lower())
        if a is None:
            return None
        return Operand(f"json_extract({alias}.value, '$.{_json_key(a.name)}')", _type(a), not _exact(a))


class JoinCollection(Collection):
    """User.groups / Group.members through the members table."""

    def __init__(self, table: str, join: str, outer: str, items: dict[str, tuple[str, str, bool, bool]]):
        self.table, self.join, self.outer, self.items = table, join, outer, items

    def exists(self, alias: str, cond: str) -> str:
        return (f"EXISTS (SELECT 1 FROM members m_{alias} JOIN {self.table} {alias} ON {self.join.format(a=alias)} "
                f"WHERE {self.outer.format(a=alias)} AND {cond})")

    def item(self, alias: str, sub: Optional[str]) -> Optional[Operand]:
        spec = self.items.get((sub or "value").lower())
        if spec is None:
            return None
        sql, t, fold_, pre = spec
        return Operand(sql.format(a=alias), t, fold_, pre)


def _type(attr) -> str:
    t = attr.type
    return getattr(t, "value", str(t))


def _exact(attr) -> bool:
    return attr.case_exact == CaseExact.true or attr.case_exact is True


def _schema_attrs(urn: str) -> dict:
    for s in S.PROVIDER.schemas:
        if str(s.id).lower() == urn.lower():
            return {a.name.lower(): a for a in s.attributes or []}
    raise KeyError(urn)


class Scope:
    """How one resource type's attributes map to SQL (see the module doc)."""

    core_urn: str
    ext_urn: str
    special: dict  # (urn, attr, sub) -> Operand | Collection

    def __init__(self) -> None:
        self.attrs = {self.core_urn.lower(): _schema_attrs(self.core_urn)}
        for urn in self.extension_urns:
            self.attrs[urn.lower()] = _schema_attrs(urn)

    extension_urns: tuple = ()

    def resolve(self, p: AttrPath):
        """-> Operand | (Collection, sub) | None for an attribute the store does not know."""
        urn = (p.uri or self.core_urn).lower()
        attr, sub = p.attr.lower(), (p.sub_attr or "").lower() or None
        if urn == self.core_urn.lower():
            common = self.common(attr, sub)
            if common is not None:
                return common
        key = (urn, attr)
        if key in self.special:
            s = self.special[key]
            if isinstance(s, Collection):
                return (s, sub)
            if isinstance(s, dict):  # complex attribute with sub-attribute columns
                return s.get(sub)
            return s if sub is None else None
        schema = self.attrs.get(urn)
        a = schema.get(attr) if schema else None
        if a is None:
            return None
        base = "$" if urn == self.core_urn.lower() else f"$.{_json_key(self._urn_case(urn))}"
        path = f"{base}.{_json_key(a.name)}"
        if a.multi_valued:
            return (JsonCollection(f"s.data, '{path}'", a), sub)
        if sub is not None:
            subs = {x.name.lower(): x for x in a.sub_attributes or []}
            sa = subs.get(sub)
            if sa is None:
                return None
            return Operand(f"json_extract(s.data, '{path}.{_json_key(sa.name)}')", _type(sa), not _exact(sa))
        if a.sub_attributes:  # a complex attribute as a whole: only `pr` makes sense
            return Operand(f"json_extract(s.data, '{path}')", "complex", False)
        return Operand(f"json_extract(s.data, '{path}')", _type(a), not _exact(a))

    def _urn_case(self, urn_lower: str) -> str:
        for u in (self.core_urn, *self.extension_urns):
            if u.lower() == urn_lower:
                return u
        return urn_lower

    def common(self, attr: str, sub: Optional[str]):
        if attr == "id" and sub is None:
            return Operand("s.id", "string", False)
        if attr == "externalid" and sub is None:
            return Operand("s.external_id", "string", False)
        if attr == "meta":
            return {"created": Operand("s.created", "dateTime", False),
                    "lastmodified": Operand("s.modified", "dateTime", False),
                    "resourcetype": Operand(f"'{self.resource_type}'", "string", False)}.get(sub or "")
        return None

    resource_type = ""


class UserScope(Scope):
    core_urn = S.USER_URN
    extension_urns = (S.ENTERPRISE_URN, S.USER_EXT_URN)
    resource_type = "User"
    table = "scim_users s JOIN users u ON u.name = s.name"

    def __init__(self) -> None:
        super().__init__()
        core, ext = S.USER_URN.lower(), S.USER_EXT_URN.lower()
        self.special = {
            (core, "username"): Operand("s.user_name_key", "string", True, True),
            (core, "active"): Operand("u.active", "boolean", False),
            (core, "groups"): JoinCollection(
                "scim_groups", "{a}.name = m_{a}.group_name", "m_{a}.user_name = u.name",
                {"value": ("{a}.id", "string", False, False),
                 "display": ("{a}.display_name_key", "string", True, True),
                 "type": ("'direct'", "string", False, False)}),
            (ext, "loginname"): Operand("u.name", "string", True),
            (ext, "uidnumber"): Operand("u.uid", "integer", False),
            (ext, "gidnumber"): Operand("u.gid", "integer", False),
            (ext, "loginshell"): Operand("u.shell", "string", False),
            (ext, "homedirectory"): Operand("(CASE WHEN u.home = '' THEN '/home/' || u.name ELSE u.home END)",
                                            "string", False),
            (ext, "sshprincipals"): JsonCollection(
                "CASE WHEN u.principals = '[]' THEN json_array(u.name) ELSE u.principals END"),
        }


class GroupScope(Scope):
    core_urn = S.GROUP_URN
    extension_urns = (S.GROUP_EXT_URN,)
    resource_type = "Group"
    table = "scim_groups s JOIN groups g ON g.name = s.name"

    def __init__(self) -> None:
        super().__init__()
        core, ext = S.GROUP_URN.lower(), S.GROUP_EXT_URN.lower()
        self.special = {
            (core, "displayname"): Operand("s.display_name_key", "string", True, True),
            (core, "members"): JoinCollection(
                "scim_users", "{a}.name = m_{a}.user_name", "m_{a}.group_name = g.name",
                {"value": ("{a}.id", "string", False, False),
                 "display": ("{a}.user_name_key", "string", True, True),
                 "type": ("'User'", "string", False, False)}),
            (ext, "groupname"): Operand("g.name", "string", True),
            (ext, "gidnumber"): Operand("g.gid", "integer", False),
        }


USERS = UserScope()
GROUPS = GroupScope()


def _bad(path: Any, why: str = "is not supported in filters here") -> InvalidFilterException:
    return InvalidFilterException(detail=f"attribute {path} {why}")


class SqlFilter(FilterVisitor[str]):
    """One filter tree -> (SQL condition, parameters)."""

    def __init__(self, scope: Scope):
        self.scope = scope
        self.params: list[Any] = []
        self.n = 0
        self._item: Optional[tuple[Collection, str]] = None  # inside a value path: (collection, alias)

    def _alias(self) -> str:
        self.n += 1
        return f"j{self.n}"

    # -- operands -------------------------------------------------------------

    def _operand(self, p: AttrPath, for_compare: bool):
        """-> Operand, or (Collection, sub) for a multi-valued attribute."""
        if self._item is not None:
            coll, alias = self._item
            sub = p.attr if p.sub_attr is None else None
            op = coll.item(alias, sub) if sub is not None else None
            if op is None:
                raise _bad(p, "is not a sub-attribute of the selected values")
            return op
        r = self.scope.resolve(p)
        if r is None:
            raise _bad(p)
        return r

    def _with(self, p: AttrPath, build, present: bool = False) -> str:
        r = self._operand(p, True)
        if isinstance(r, tuple):
            coll, sub = r
            alias = self._alias()
            if present and sub is None:
                return coll.exists(alias, "1")
            op = coll.item(alias, sub)
            if op is None:
                raise _bad(p)
            return coll.exists(alias, build(op))
        return build(r)

    # -- nodes ----------------------------------------------------------------

    def visit_logical_expr(self, node: LogicalExpr) -> str:
        joiner = " AND " if node.op == LogicalOperator.and_ else " OR "
        return "(" + joiner.join(self.visit(t) for t in node.terms) + ")"

    def visit_not(self, node: Not) -> str:
        return f"(NOT COALESCE({self.visit(node.expr)}, 0))"

    def visit_present(self, node: Present) -> str:
        def build(op: Operand) -> str:
            if op.type == "string":
                return f"({op.sql} IS NOT NULL AND {op.sql} <> '')"
            if op.type == "complex":
                return f"({op.sql} IS NOT NULL AND {op.sql} NOT IN ('{{}}', '[]'))"
            return f"({op.sql} IS NOT NULL)"
        return self._with(node.attr_path, build, present=True)

    def visit_value_path(self, node: ValuePath) -> str:
        r = self._operand(node.attr_path, False)
        if not isinstance(r, tuple) or r[1] is not None:
            raise _bad(node.attr_path, "is not multi-valued; a [filter] selects values of a multi-valued attribute")
        coll = r[0]
        alias = self._alias()
        outer, self._item = self._item, (coll, alias)
        try:
            cond = self.visit(node.val_filter)
        finally:
            self._item = outer
        return coll.exists(alias, cond)

    def visit_comparison(self, node: Comparison) -> str:
        return self._with(node.attr_path, lambda op: self._compare(op, node.op, node.value, node.attr_path))

    def _compare(self, op: Operand, cop: CompareOperator, value: Any, path: AttrPath) -> str:
        expr = op.sql
        if value is None:
            # `eq null` is "not present" in practice; the grammar allows it
            return f"({expr} IS NULL)" if cop == CompareOperator.eq else f"({expr} IS NOT NULL)"
        if op.type == "boolean":
            if isinstance(value, str):  # as pydantic reads it (Entra writes "True")
                value = {"true": True, "t": True, "yes": True, "y": True, "on": True, "1": True,
                         "false": False, "f": False, "no": False, "n": False, "off": False, "0": False
                         }.get(value.strip().lower(), value)
            if not isinstance(value, bool) or cop not in (CompareOperator.eq, CompareOperator.ne):
                raise _bad(path, "is a boolean: compare it with eq or ne and true or false")
            return self._binary(expr, cop, int(value))
        if op.type in ("integer", "decimal"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _bad(path, "is a number: compare it with a number")
            if cop in (CompareOperator.co, CompareOperator.sw, CompareOperator.ew):
                raise _bad(path, f"is a number; {cop.value} needs a string attribute")
            return self._binary(expr, cop, value)
        if op.type == "dateTime":
            if isinstance(value, str):
                try:
                    value = iso(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
                except ValueError:
                    raise _bad(path, f"is a dateTime; {value!r} is not one") from None
            elif isinstance(value, dt.datetime):
                value = iso(value)
            return self._binary(expr, cop, value)
        if op.type == "complex":
            raise _bad(path, "is complex: compare one of its sub-attributes")
        if not isinstance(value, str):
            value = str(value).lower() if isinstance(value, bool) else str(value)
        if op.fold:
            value = fold(value)
            if not op.prefolded:
                expr = f"scim_fold({expr})"
        if cop == CompareOperator.co:
            self.params.append(value)
            return f"(instr({expr}, ?) > 0)"
        if cop == CompareOperator.sw:
            self.params += [len(value), value]
            return f"(substr({expr}, 1, ?) = ?)"
        if cop == CompareOperator.ew:
            if not value:
                return f"({expr} IS NOT NULL)"
            self.params += [len(value), value]
            return f"(length({expr}) >= ? AND substr({expr}, -{len(value)}) = ?)"
        return self._binary(expr, cop, value)

    def _binary(self, expr: str, cop: CompareOperator, value: Any) -> str:
        sym = {CompareOperator.eq: "=", CompareOperator.gt: ">", CompareOperator.ge: ">=",
               CompareOperator.lt: "<", CompareOperator.le: "<="}.get(cop)
        self.params.append(value)
        if cop == CompareOperator.ne:
            return f"({expr} IS NULL OR {expr} <> ?)"
        if sym is None:
            raise InvalidFilterException(detail=f"operator {cop.value} does not apply to this attribute")
        return f"({expr} {sym} ?)"


def to_sql(scope: Scope, node: Optional[FilterNode]) -> tuple[str, list]:
    if node is None:
        return "1", []
    v = SqlFilter(scope)
    return v.visit(node), v.params
