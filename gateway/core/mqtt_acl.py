"""The MQTT till ACL of one gateway: which broker accounts may send requests for which tills.

The gateway's configuration is the source of truth (``[mqtt.acl]``: broker user name → till
ids, docs/mqtt.md "Security"). An MQTT subscriber cannot see who published a message, so the
ACL is enforced in two places that are both derived from that one table:

- the **broker** enforces who may publish on which request topic: :func:`render_mosquitto_acl`
  writes the Mosquitto ``acl_file`` (``fiscal-gateway mqtt-acl``); each till account may write
  only its tills' request topics and read only their reply topics, the status and the events;
- the **gateway** refuses (``UNKNOWN_TILL``) a request on the topic of a till that no account
  is given (:meth:`TillAcl.allows`), so a broker left open, or an account shared with the
  gateway's own, still cannot create chains nobody configured.

Pure: no file, no broker. Validation with field paths is in gateway.config.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.core.mqtt_topics import Topics


@dataclass(frozen=True, slots=True)
class TillAcl:
    """``(user, tills)`` pairs in configuration order; empty means no ACL configured."""

    entries: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: every till some account is given (made once: :meth:`allows` runs per request)
    tills: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tills", frozenset(t for _, ts in self.entries for t in ts))

    @property
    def configured(self) -> bool:
        return bool(self.entries)

    def allows(self, till: str) -> bool:
        """May a request for ``till`` be served? Always, when no ACL is configured."""
        return not self.entries or till in self.tills

    def users_of(self, till: str) -> tuple[str, ...]:
        return tuple(user for user, tills in self.entries if till in tills)


def render_mosquitto_acl(
    topics: Topics, gateway_user: str, acl: TillAcl, *, source: str = "", notes: Iterable[str] = ()
) -> str:
    """The Mosquitto ``acl_file`` text for ``acl`` (Mosquitto 2.x syntax, ``man mosquitto.conf``).

    The gateway's account may read and write everything under ``<prefix>/<gateway>/``. A till
    account may publish requests for its tills, read their replies (``.../res`` and every level
    below it: the 3.1.1 reply topic and v5 response topics), the retained status and the
    events. Anonymous clients get nothing (no rules before the first ``user`` line).
    """
    base = topics.base
    lines = [
        f"# Mosquitto acl_file for fiscal gateway {topics.gateway!r} (topics {base}/...),",
        "# written by `fiscal-gateway mqtt-acl`"
        + (f" from {source}" if source else "")
        + " ([mqtt.acl]). Do not edit: change [mqtt.acl],",
        "# render again, then reload Mosquitto (SIGHUP) and the gateway (SIGHUP).",
        *(f"# {n}".rstrip() for n in notes),
        "",
        f"# the gateway ([mqtt] username = {gateway_user!r})",
        f"user {gateway_user}",
        f"topic readwrite {base}/#",
    ]
    for user, tills in acl.entries:
        lines += ["", f"# till account {user!r}: {', '.join(tills)}", f"user {user}"]
        for till in tills:
            lines.append(f"topic write {topics.request(till)}")
            lines.append(f"topic read {topics.reply(till)}/#")
        lines += [f"topic read {topics.status}", f"topic read {topics.events}"]
    return "\n".join(lines) + "\n"
