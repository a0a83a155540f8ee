"""Optional API keys: ``Authorization: Bearer <key>``, a bare ``Authorization: <key>`` (what the
original service's clients send) or ``X-API-Key: <key>``. Keys are compared in constant time and
never echoed."""
import hmac


class ApiKeyAuth:
    """Accepts a request when any presented credential equals any configured key."""

    def __init__(self, keys):
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @staticmethod
    def _presented(headers) -> list:
        found = []
        auth = headers.get("Authorization", "").strip()
        if auth:
            scheme, _, rest = auth.partition(" ")
            found.append(rest.strip() if scheme.lower() == "bearer" and rest.strip() else auth)
        key = headers.get("X-API-Key", "").strip()
        if key:
            found.append(key)
        return [f.encode() for f in found]

    def allows(self, headers) -> bool:
        if not self._keys:
            return True
        ok = False
        for presented in self._presented(headers):
            for key in self._keys:  # no early exit: the time does not depend on which key matched
                ok |= hmac.compare_digest(presented, key)
        return ok
