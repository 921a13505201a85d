"""What the benchmark stores and what the echo floor answers: one shape for both.

Integration ids are derived from (salt, index) so that client processes can pick any of a
million stored integrations from an index alone, without shipping the id list to each of them.
They are still random-looking UUIDs, so index lookups hit the b-tree the way uuid4 ids do.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.domain.credentials import bearer_headers

ENVIRONMENT = "bench"
PROVIDER = "acme"
TOKEN_TYPE = "Bearer"
SCOPES = ("read", "write")
# About the size of a Google OAuth access token; the echo floor answers a token this long too.
TOKEN_LENGTH = 160
REFRESH_TOKEN_LENGTH = 64
# Seeded tokens stay valid well beyond any run, so nothing but the storm ever refreshes.
VALID_FOR = timedelta(days=1)


def integration_id(salt: str, index: int) -> str:
    digest = hashlib.blake2b(f"{salt}:{index}".encode(), digest_size=16).digest()
    return str(uuid.UUID(bytes=digest, version=4))


def user_id(index: int) -> str:
    return f"bench-user-{index:08d}"


def random_token(length: int) -> str:
    raw = base64.urlsafe_b64encode(os.urandom(length * 3 // 4 + 3)).decode()
    return raw[:length]


def seeded_expiry(now: datetime | None = None) -> datetime:
    # A fixed sub-second part: Timestamp.nanos is a varint, so its encoded size depends on its
    # value; fixing it makes the broker's responses and the echo's exactly the same size.
    return ((now or datetime.now(UTC)) + VALID_FOR).replace(microsecond=654_321)


def sample_response(salt: str = "echo") -> pb.GetAccessTokenResponse:
    """A response shaped exactly like the broker's for a seeded row (same field lengths)."""
    expires = Timestamp()
    expires.FromDatetime(seeded_expiry())
    token = random_token(TOKEN_LENGTH)
    return pb.GetAccessTokenResponse(
        access_token=token,
        token_type=TOKEN_TYPE,
        expires_at=expires,
        scopes=SCOPES,
        integration_id=integration_id(salt, 0),
        refreshed=False,
        credential_type=pb.CREDENTIAL_TYPE_AUTHORIZATION_CODE,
        headers=bearer_headers(TOKEN_TYPE, token),
    )
