"""HTTP facts every part that relays a request needs."""

# Hop-by-hop headers (RFC 9110 section 7.6.1), plus the framing a relay always recomputes:
# none of them is passed on from one connection to the next.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
