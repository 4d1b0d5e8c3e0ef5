"""Op rules: how channel ids flow through one kind of op, and what of it must be sliced.

A rule is an object with

- ``ops``: the op types it handles (``{"Conv"}``, ``{"Relu", "Gelu", ...}``) and
  ``domain`` (``""`` for standard ONNX ops, or a custom domain);
- ``priority``: precedence among rules for the same op (higher wins; built-in rules use
  0, and generic fall-backs such as elementwise ops use negative values);
- ``creates_channels``: True for rules that give fresh ids to a node's outputs (weighted
  layers), so they run even when no input carries ids;
- ``applies(node, ctx)``: an optional finer test (a rule for depthwise Convs only);
- ``propagate(node, ctx)``: reads the ids of the node's inputs (``ctx.ids``), and records
  what follows: ids of the outputs (``ctx.set_ids``), coupling (``ctx.couple``), constants
  to slice (``ctx.slice``), attributes and shape values to update (``ctx.fixup``), and
  channels that must stay (``ctx.block``). See :class:`optcc.channels.ChannelContext`.

For each node the analysis takes the rules registered for its op type and domain, in
order of precedence, and lets the first whose ``applies`` is true propagate. Ties in
priority go to the rule registered last, so a plugin's rule replaces a built-in one of the
same priority. A node that carries ids into an op without any rule blocks them.

Plugins contribute rules through the ``optcc_channel_rules`` hook (see
:mod:`optcc.hookspecs`); :func:`default_rules` gathers the built-in rules and every
plugin's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import onnx_graphsurgeon as gs

if TYPE_CHECKING:
    from optcc.channels.graph import ChannelContext

logger = logging.getLogger(__name__)


class ChannelRule:
    """Base class of op rules (see the module docstring for the contract)."""

    ops: ClassVar[frozenset[str]] = frozenset()
    domain: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    creates_channels: ClassVar[bool] = False

    def applies(self, node: gs.Node, ctx: ChannelContext) -> bool:
        """Whether this rule handles ``node`` (default: every node of its op types)."""
        return True

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        """Record how ``node`` moves, couples, slices or blocks its inputs' channel ids."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ops={sorted(self.ops)}, priority={self.priority})"


@dataclass(frozen=True)
class RegisteredRule:
    """A rule, the plugin that registered it, and its registration order."""

    rule: ChannelRule
    owner: str
    order: int


class RuleRegistry:
    """Op type -> rules, in order of precedence (priority, then latest registration)."""

    def __init__(self, rules: Iterable[ChannelRule] = (), owner: str = "optcc") -> None:
        self._by_op: dict[tuple[str, str], list[RegisteredRule]] = {}
        self._count = 0
        for rule in rules:
            self.register(rule, owner)

    def register(self, rule: ChannelRule | type[ChannelRule], owner: str = "") -> ChannelRule:
        """Add ``rule`` (an instance, or a class that takes no arguments); return it.

        Raises TypeError for anything that is not a :class:`ChannelRule` with op types.
        """
        if isinstance(rule, type) and issubclass(rule, ChannelRule):
            rule = rule()
        if not isinstance(rule, ChannelRule):
            raise TypeError(f"{rule!r} is not an optcc.channels.ChannelRule")
        if not rule.ops:
            raise TypeError(f"{type(rule).__name__} declares no op types ('ops')")
        self._count += 1
        entry = RegisteredRule(rule, owner, self._count)
        for op in rule.ops:
            rules = self._by_op.setdefault((rule.domain, op), [])
            rules.append(entry)
            rules.sort(key=lambda r: (-r.rule.priority, -r.order))
        return rule

    def extend(self, other: RuleRegistry) -> None:
        """Register every rule of ``other`` after this registry's own."""
        entries = {id(e.rule): e for rules in other._by_op.values() for e in rules}
        for entry in sorted(entries.values(), key=lambda e: e.order):
            self.register(entry.rule, entry.owner)

    def rule_names(self) -> list[str]:
        """Class names of the registered rules, in registration order."""
        entries = {id(e.rule): e for rules in self._by_op.values() for e in rules}
        return [type(e.rule).__name__ for e in sorted(entries.values(), key=lambda e: e.order)]

    def candidates(self, op: str, domain: str = "") -> list[RegisteredRule]:
        """The rules for ``op`` in order of precedence."""
        return list(self._by_op.get((domain or "", op), []))

    def rule_for(self, node: gs.Node, ctx: ChannelContext) -> ChannelRule | None:
        """The rule that handles ``node``: the first candidate whose ``applies`` is true."""
        for entry in self._by_op.get((node.domain or "", node.op), []):
            if entry.rule.applies(node, ctx):
                return entry.rule
        return None

    def owners(self) -> dict[str, list[str]]:
        """Op type -> owners of its rules, in order of precedence (for listings)."""
        return {
            (f"{domain}::{op}" if domain else op): [e.owner for e in entries]
            for (domain, op), entries in sorted(self._by_op.items())
        }


def builtin_rules() -> RuleRegistry:
    """A registry holding only optcc's built-in rules."""
    from optcc.channels.builtin import BUILTIN_RULES

    return RuleRegistry(BUILTIN_RULES, owner="optcc")


def default_rules() -> RuleRegistry:
    """Built-in rules plus the rules every loaded plugin contributes through the
    ``optcc_channel_rules`` hook."""
    from optcc.plugins import get_registry

    rules = builtin_rules()
    rules.extend(get_registry().channel_rules)
    return rules
