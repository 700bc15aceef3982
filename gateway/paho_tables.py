"""Shared lookup tables for paho-mqtt's MQTT v5 ``Properties`` and ``ReasonCode``.

paho-mqtt 2.x builds the same constant tables in every instance: ``Properties.__init__`` a
dict of 40 property names and one of 27 property types (with ``list.index`` calls), and
``ReasonCode.__init__`` a copy of its 60-entry names table. paho makes a ``Properties`` for
every PUBLISH and PUBACK it reads and a ``ReasonCode`` for every PUBACK, so with MQTT v5 this
was the largest single part of the gateway's CPU per MQTT request (docs/performance.md,
"MQTT"). :func:`share_tables` makes both constructors reuse one copy of their tables, built
once by paho's own code; name look-ups also use dicts made from those same tables. Nothing
paho reads or sends changes (tests/unit/test_paho_tables.py packs and unpacks with and without
it and compares).

paho never writes to these tables after construction; should a future paho version change
the constructors, :func:`share_tables` notices (the instance does not hold the attributes it
expects) and leaves paho as it is.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

_PROPERTY_TABLES = ("types", "names", "properties")
#: Properties that may occur more than once (paho's allowsMultiple): Subscription Identifier
#: and User Property.
_MULTIPLE = frozenset((11, 38))
#: The paho-mqtt versions whose constructors and __setattr__ this was checked against.
VERIFIED_PAHO_VERSIONS = frozenset(("2.2.0",))


def share_tables() -> bool:
    """Patch paho once (idempotent). True when the shared tables are in use."""
    if getattr(Properties, "_fg_shared_tables", False):
        return True
    if version("paho-mqtt") not in VERIFIED_PAHO_VERSIONS:
        return False
    template = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if set(vars(template)) != {"packetType", *_PROPERTY_TABLES}:
        return False  # not the constructor this was written for
    types, names, properties = (getattr(template, k) for k in _PROPERTY_TABLES)
    ident_of: dict[str, int] = {name.replace(" ", ""): ident for name, ident in names.items()}
    name_of: dict[int, str] = {}
    for name, ident in names.items():
        name_of[ident] = name  # paho's getNameFromIdent returns the last match

    def properties_init(self: Any, packetType: int) -> None:
        object.__setattr__(self, "packetType", packetType)
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "properties", properties)

    compressed_names = frozenset(ident_of)
    private = frozenset(("packetType", *_PROPERTY_TABLES))

    def properties_setattr(self: Any, name: str, value: Any) -> None:
        # paho 2.2's __setattr__, except that "is this a property name" is a set look-up
        # (paho builds a list of all 40 names on every call)
        name = name.replace(" ", "")
        if name in private:
            object.__setattr__(self, name, value)
            return
        if name not in compressed_names:
            raise MQTTException(f"Property name must be one of {names.keys()}")
        if self.packetType not in properties[ident_of[name]][1]:
            raise MQTTException(
                f"Property {name} does not apply to packet type "
                f"{PacketTypes.Names[self.packetType]}"
            )
        if not isinstance(value, list):
            if name in ("ReceiveMaximum", "TopicAlias") and (value < 1 or value > 65535):
                raise MQTTException(f"{name} property value must be in the range 1-65535")
            if name == "TopicAliasMaximum" and (value < 0 or value > 65535):
                raise MQTTException(f"{name} property value must be in the range 0-65535")
            if name in ("MaximumPacketSize", "SubscriptionIdentifier") and (
                value < 1 or value > 268435455
            ):
                raise MQTTException(f"{name} property value must be in the range 1-268435455")
            if name in (
                "RequestResponseInformation",
                "RequestProblemInformation",
                "PayloadFormatIndicator",
            ) and (value != 0 and value != 1):
                raise MQTTException(f"{name} property value must be 0 or 1")
        if ident_of[name] in _MULTIPLE:
            if not isinstance(value, list):
                value = [value]
            if name in vars(self):
                value = object.__getattribute__(self, name) + value
        object.__setattr__(self, name, value)

    def properties_clear(self: Any) -> None:
        # paho's clear: delete every property attribute that is set (none of these names is
        # a class attribute, so "set" is "in the instance dict")
        attrs = vars(self)
        for compressed in compressed_names & attrs.keys():
            delattr(self, compressed)

    def get_ident_from_name(self: Any, compressedName: str) -> int:
        return ident_of.get(compressedName, -1)

    def get_name_from_ident(self: Any, identifier: int) -> str | None:
        return name_of.get(identifier)

    reason = ReasonCode(PacketTypes.PUBACK)
    if set(vars(reason)) != {"names", "packetType", "value"}:
        return False
    reason_names = ReasonCode.names

    def reason_init(
        self: Any,
        packetType: int,
        aName: str = "Success",
        identifier: int = -1,
    ) -> None:
        # paho's constructor, minus the copy of the class's names table
        self.names = reason_names
        self.packetType = packetType
        if identifier == -1:
            if packetType == PacketTypes.DISCONNECT and aName == "Success":
                aName = "Normal disconnection"
            self.set(aName)
        else:
            self.value = identifier
            self.getName()  # check it's good

    Properties.__init__ = properties_init  # type: ignore[method-assign]
    Properties.__setattr__ = properties_setattr  # type: ignore[method-assign]
    Properties.clear = properties_clear  # type: ignore[method-assign]
    Properties.getIdentFromName = get_ident_from_name  # type: ignore[method-assign]
    Properties.getNameFromIdent = get_name_from_ident  # type: ignore[method-assign]
    ReasonCode.__init__ = reason_init  # type: ignore[method-assign]
    Properties._fg_shared_tables = True  # type: ignore[attr-defined]
    return True
