"""Bearer-token authentication for the HTTP API: a Falcon middleware.

With a token configured, every request but the health check must carry `Authorization: Bearer
<token>`, or gets 401 before routing: an unauthenticated client learns nothing (not even which paths
exist) and no request body is read for it. The comparison takes the same time wherever the tokens
differ, and the token never appears in a log or an answer.
"""

from __future__ import annotations

import hmac

import falcon

# Load balancers and `distrack up` probe this without credentials; it says only whether the
# database answers.
PUBLIC_PATHS = frozenset({"/health"})
CHALLENGE = 'Bearer realm="distrack"'


class BearerAuth:
    """Falcon middleware that refuses requests without the right bearer token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty token would let everyone in")
        self._token = token.encode()

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        # req.path is what the router matches (percent-decoded, trailing slash removed), so a
        # spelling that reaches the health check is public and no other spelling is.
        if req.path in PUBLIC_PATHS:
            return
        header = req.get_header("Authorization")
        if header is None:
            raise falcon.HTTPUnauthorized(
                title="Authentication required",
                description="send the API token as 'Authorization: Bearer <token>'",
                challenges=[CHALLENGE],
            )
        scheme, _, credentials = header.strip().partition(" ")
        # WSGI hands headers over as latin-1 text; any str encodes to UTF-8 bytes (surrogatepass
        # covers the impossible rest), so the comparison below never raises.
        given = credentials.strip().encode("utf-8", "surrogatepass")
        # compare_digest first, so a wrong scheme costs the same time as a wrong token.
        if not hmac.compare_digest(given, self._token) or scheme.lower() != "bearer":
            raise falcon.HTTPUnauthorized(
                title="Invalid token",
                description="the Authorization header does not hold this API's bearer token",
                challenges=[f'{CHALLENGE}, error="invalid_token"'],
            )
