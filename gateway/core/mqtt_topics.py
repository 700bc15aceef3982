"""The MQTT topic scheme of one gateway (docs/mqtt.md): names built and parsed, nothing sent.

::

    <prefix>/<gateway>/tills/<till>/req     requests from a till (the gateway subscribes, QoS 1)
    <prefix>/<gateway>/tills/<till>/res     replies when the request named no v5 response topic
    <prefix>/<gateway>/status               retained status JSON; the Last Will is {"online":false}
    <prefix>/<gateway>/events               alerts (not retained)

Pure: no client, no IO. It does not decide whether a till may use the gateway (the dispatcher's
``[tills] allowed`` and the broker's ACL do), only which till a topic names and where a reply to
that till may go. A v5 response topic is accepted only under the till's own reply topic, so a
request cannot make the gateway publish on another till's topics or on the status topic.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Characters a topic name we publish to must not hold (wildcards; NUL is illegal in MQTT).
_FORBIDDEN = ("+", "#", "\x00")
#: MQTT strings are at most 65535 bytes of UTF-8.
MAX_TOPIC_BYTES = 65535


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str
    gateway: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.gateway}"

    @property
    def request_filter(self) -> str:
        """The subscription that receives every till's requests."""
        return f"{self.base}/tills/+/req"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    def request(self, till: str) -> str:
        return f"{self.base}/tills/{till}/req"

    def reply(self, till: str) -> str:
        return f"{self.base}/tills/{till}/res"

    def till_of(self, topic: str) -> str | None:
        """The till a request topic names, or None if the topic is not a request topic."""
        head = f"{self.base}/tills/"
        if not topic.startswith(head) or not topic.endswith("/req"):
            return None
        till = topic[len(head) : -len("/req")]
        if not till or "/" in till:
            return None
        return till

    def response_topic_allowed(self, till: str, response_topic: str) -> bool:
        """A v5 response topic must be the till's reply topic or a level below it."""
        own = self.reply(till)
        if response_topic != own and not response_topic.startswith(own + "/"):
            return False
        if any(c in response_topic for c in _FORBIDDEN):
            return False
        return len(response_topic.encode("utf-8")) <= MAX_TOPIC_BYTES
