"""
Asking a homeserver whose an access token is (its
C{/_matrix/client/v3/account/whoami}) and reading its answer as a verdict
(L{judge}), bounded (L{read_bounded}); and naming, for the log, why no
verdict came (L{failure_kind}, L{Complaints}).  The policy that asks,
remembers and shares the questions is L{rendezvous_twisted.http.tokens}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

#: Where a homeserver says whose an access token is (Matrix client-server
#: API), under its base URL.
WHOAMI_PATH = "/_matrix/client/v3/account/whoami"
#: The longest time one kind of failure to reach the homeserver stays out
#: of the log after it was logged: a dead homeserver costs a line a minute.
COMPLAINT_INTERVAL_SECONDS = 60.0
#: The homeserver's 401 error codes passed on to the client as they are:
#: the client-server API's codes for a token that does not (or no longer)
#: work.  Any other is answered as M_UNKNOWN_TOKEN.
PASSED_ERRCODES = frozenset(("M_UNKNOWN_TOKEN", "M_MISSING_TOKEN", "M_USER_LOCKED"))


@dataclass(frozen=True, slots=True)
class Invalid:
    """
    The verdict on a token the homeserver does not accept: the errcode and
    any C{soft_logout} to answer with.
    """

    errcode: str = "M_UNKNOWN_TOKEN"
    soft_logout: bool | None = None


#: What the homeserver can say of a token: may create (True), may not
#: (False), not valid (L{Invalid}).
Verdict = bool | Invalid


class Unavailable(Exception):
    """
    The homeserver answered, but not with a verdict (its status or body);
    C{str()} names the kind, for the log.
    """


def judge(code: int, body: bytes) -> Verdict:
    """
    The verdict of a whoami answer of status C{code} and body C{body}:

      - C{200} with a JSON object holding a non-empty string C{user_id}:
        True, unless C{"is_guest": true} (False: guests may not create);
      - C{401}: L{Invalid}, with the homeserver's errcode if it is one of
        L{PASSED_ERRCODES} (else C{M_UNKNOWN_TOKEN}) and its boolean
        C{soft_logout} if it gave one (whatever its body, a 401 is never a
        yes);
      - C{403}: False.  The homeserver knows the token but will not serve
        its holder (suspended, guest access refused, terms not accepted):
        it is a refusal by policy, not a token to refresh;
      - anything else (C{429}, C{5xx}, redirects, a 200 that is not such an
        object): raises L{Unavailable}.
    """
    if code == 200:
        answer = _json_object(body)
        if answer is None:
            raise Unavailable("answer not a JSON object")
        user_id, is_guest = answer.get("user_id"), answer.get("is_guest", False)
        if not isinstance(user_id, str) or not user_id:
            raise Unavailable("answer without a user_id")
        if not isinstance(is_guest, bool):
            raise Unavailable("answer with an is_guest that is not a boolean")
        return not is_guest
    if code == 401:
        answer = _json_object(body) or {}
        errcode, soft_logout = answer.get("errcode"), answer.get("soft_logout")
        return Invalid(
            errcode if errcode in PASSED_ERRCODES else "M_UNKNOWN_TOKEN",
            soft_logout if isinstance(soft_logout, bool) else None,
        )
    if code == 403:
        return False
    if code == 429:
        raise Unavailable("rate limited by the homeserver (429)")
    raise Unavailable(f"answered {code}")


def _json_object(body: bytes) -> dict[str, object] | None:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


class _BoundedBody(Protocol):
    """
    Reads a response's body up to C{limit} bytes into L{finished}; past it,
    or when L{finished} is cancelled, stops the response's transport (which
    closes the connection) rather than read on.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.finished: Deferred[bytes] | None = Deferred(self._cancelled)
        self.result = self.finished

    def _stop(self) -> None:
        # IResponse.deliverBody connects its protocol to an IPushProducer.
        cast(IPushProducer, self.transport).stopProducing()

    def _cancelled(self, d: Deferred[bytes]) -> None:
        self.finished = None
        self._stop()

    def too_large(self) -> None:
        finished, self.finished = self.finished, None
        if finished is not None:
            self.parts.clear()
            self._stop()
            finished.errback(Unavailable(f"answer over {self.limit} bytes"))

    def dataReceived(self, data: bytes) -> None:
        if self.finished is None:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.too_large()
        else:
            self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        finished, self.finished = self.finished, None
        if finished is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(b"".join(self.parts))
        else:
            finished.errback(reason)


def read_bounded(response: IResponse, limit: int) -> Deferred[bytes]:
    """
    The body of C{response}, or a failure with L{Unavailable} as soon as
    it is known to be over C{limit} bytes.  Cancelling it closes the
    connection.
    """
    body = _BoundedBody(limit)
    response.deliverBody(body)
    if response.length is not UNKNOWN_LENGTH and response.length > limit:
        body.too_large()
    return body.result


class Complaints:
    """
    Logs each kind of failure to get a verdict, at most once every
    L{COMPLAINT_INTERVAL_SECONDS}, with how many went unlogged since.
    Kinds are few (a status code, an error's type), so their record is
    small.
    """

    def __init__(self, clock: IReactorTime, log: Logger, homeserver: str) -> None:
        self._clock = clock
        self._log = log
        self._homeserver = homeserver
        self._last: dict[str, tuple[float, int]] = {}

    def note(self, kind: str) -> None:
        now = self._clock.seconds()
        last = self._last.get(kind)
        if last is not None and now - last[0] < COMPLAINT_INTERVAL_SECONDS:
            self._last[kind] = (last[0], last[1] + 1)
            return
        self._last[kind] = (now, 0)
        self._log.warn(
            "the homeserver {homeserver} cannot judge access tokens ({kind}): "
            "answering 503{unlogged}",
            homeserver=self._homeserver,
            kind=kind,
            unlogged=f" ({last[1]} more since the last line)" if last and last[1] else "",
        )


def failure_kind(failure: Failure) -> str:
    """
    What kind of failure got no verdict, for the log: never the token (the
    request's headers are in none of these).
    """
    if failure.check(Unavailable):
        return str(failure.value)
    reasons = [failure]
    if isinstance(
        failure.value, ResponseFailed | ResponseNeverReceived | RequestTransmissionFailed
    ):
        reasons += failure.value.reasons
    for reason in reasons:
        if reason.check(error.ConnectionRefusedError):
            return "connection refused"
        if reason.check(error.DNSLookupError):
            return "DNS lookup failed"
        if reason.check(error.TimeoutError):
            return "connection timed out"
        if reason.check(SSL.Error):
            return "TLS failed"
    return f"no verdict ({type(failure.value).__name__})"
