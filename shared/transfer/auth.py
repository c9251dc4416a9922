"""Authentication of KV connections by a shared secret (`--kv-transfer-secret`).

ucxx 0.52 offers no bind address (its Python listener always takes the wildcard), so a decode
worker's KV port answers on every interface. When the secret is set on both ends, every connection
opens with a challenge-response in which each end proves that it knows the secret, without sending
it, before any request or payload is accepted:

    receiver                                               sender
    challenge {nonce_r}                        ->
                                               <-          hello {..., address, nonce_s, proof_s}
    welcome {proof_r} | refused {reason}       ->

    proof_s = HMAC-SHA256(secret, "baton-kv-auth/1 \\n sender   \\n nonce_r \\n nonce_s \\n address")
    proof_r = HMAC-SHA256(secret, "baton-kv-auth/1 \\n receiver \\n nonce_r \\n nonce_s \\n address")

- both nonces are 32 random bytes (hex), fresh for each connection: a proof recorded on one connection
  is worth nothing on another;
- the role in the message differs by direction, so neither end's proof passes for the other's;
- `address` is the receiver's published address, which the sender dialled: a peer that relays the
  challenge of one receiver while posing as another (at another address) gets a proof the real one
  rejects.

Proofs are compared with `hmac.compare_digest`. The KV that follows is not encrypted: the secret keeps
strangers from writing into a decode worker's cache or receiving a prefill worker's pushes, not an
eavesdropper on the wire from reading them (keep the transfer on a private network).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any, Literal, TypeGuard

from baton.shared.config import check_kv_transfer_secret

NONCE_NBYTES = 32
_LABEL = "baton-kv-auth/1"

Role = Literal["sender", "receiver"]


def new_nonce() -> str:
    """A fresh challenge: NONCE_NBYTES random bytes as hex."""
    return secrets.token_hex(NONCE_NBYTES)


def is_nonce(value: Any) -> TypeGuard[str]:
    """Whether `value` has the form of a nonce (2 * NONCE_NBYTES lowercase hex digits)."""
    return (
        isinstance(value, str)
        and len(value) == 2 * NONCE_NBYTES
        and all(c in "0123456789abcdef" for c in value)
    )


class TransferSecret:
    """The secret KV connections are authenticated with. Never shown (repr, str) and never sent: only
    proofs of it travel. Pickles (the workers hand it to their KV processes through their pipe)."""

    __slots__ = ("_key",)

    def __init__(self, secret: str) -> None:
        """ValueError if `secret` is too short (the message never shows it)."""
        check_kv_transfer_secret(secret)
        self._key = secret.encode()

    def __repr__(self) -> str:
        return "TransferSecret('**********')"

    __str__ = __repr__

    def __getstate__(self) -> bytes:
        return self._key

    def __setstate__(self, key: bytes) -> None:
        self._key = key

    def proof(self, role: Role, receiver_nonce: str, sender_nonce: str, address: str) -> str:
        """What `role` sends to prove the secret on the connection the two nonces belong to (hex)."""
        message = "\n".join((_LABEL, role, receiver_nonce, sender_nonce, address)).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def verify(self, proof: Any, role: Role, receiver_nonce: str, sender_nonce: str, address: str) -> bool:
        """Whether `proof` (as received: any JSON value) is `role`'s proof for this connection; in time
        independent of where a wrong proof differs."""
        if not isinstance(proof, str):
            return False
        expected = self.proof(role, receiver_nonce, sender_nonce, address)
        return hmac.compare_digest(expected.encode(), proof.encode(errors="replace"))
