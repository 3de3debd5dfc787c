"""Message types, their payload limits and the protocol's error codes (docs/PROTOCOL.md)."""
from enum import IntEnum, StrEnum

PROTOCOL_NAME = "deltaxfer"
VERSIONS = (1,)                       # the protocol versions this implementation speaks
CAPS = ("lz4", "xor", "tls")          # the capabilities version 1 defines, offered by default
RUNC_CAP = "runc"   # offered by a receiver that restores runc containers (serve --runc-root)
DEFINED_CAPS = CAPS + (RUNC_CAP,)

MAGIC = b"\xd8X"
HEADER_SIZE = 24

KiB = 1 << 10
MiB = 1 << 20
CONTROL_LIMIT = 64 * KiB
PAGES_LIMIT = 16 * MiB + 64           # u32 index + a core frame (raw payload <= 16 MiB)
TABLE_LIMIT = 4 * MiB                 # PAGEMAP, HELD
FILE_DATA_LIMIT = 1 * MiB

MAX_FILE_SIZE = 1 << 30
MAX_FILES = 10_000
MAX_IMAGES = 4096
MAX_SESSION_NAME = 64
MAX_IMAGE_NAME = 128
HANDSHAKE_TIMEOUT = 10.0


class MsgType(IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    AUTH = 0x03
    READY = 0x04
    BEGIN = 0x10
    STATE = 0x11
    HELD = 0x12
    STATE_END = 0x13
    ROUND = 0x20
    IMAGE = 0x21
    PAGEMAP = 0x22
    PAGES = 0x23
    IMAGE_END = 0x24
    ROUND_END = 0x25
    ROUND_OK = 0x26
    FILE = 0x30
    FILE_DATA = 0x31
    FILE_END = 0x32
    COMMIT = 0x40
    COMMITTED = 0x41
    RESUME = 0x42
    RESUMED = 0x43
    # post-copy (docs/PROTOCOL.md "Post-copy"): PENDING before COMMIT, then after RESUMED
    # POSTCOPY_PAGES from the source, FETCH from the destination, POSTCOPY_END -> _DONE
    PENDING = 0x50
    POSTCOPY_PAGES = 0x51
    FETCH = 0x52
    POSTCOPY_END = 0x53
    POSTCOPY_DONE = 0x54
    ERROR = 0x7E
    CLOSE = 0x7F


BINARY_TYPES = frozenset({MsgType.HELD, MsgType.PAGEMAP, MsgType.PAGES, MsgType.FILE_DATA,
                          MsgType.PENDING, MsgType.POSTCOPY_PAGES, MsgType.FETCH})
CONTROL_TYPES = frozenset(MsgType) - BINARY_TYPES
HANDSHAKE_TYPES = frozenset({MsgType.HELLO, MsgType.WELCOME, MsgType.AUTH, MsgType.READY,
                             MsgType.ERROR, MsgType.CLOSE})

LIMITS: dict[MsgType, int] = {t: CONTROL_LIMIT for t in CONTROL_TYPES}
LIMITS.update({MsgType.HELD: TABLE_LIMIT, MsgType.PAGEMAP: TABLE_LIMIT,
               MsgType.PAGES: PAGES_LIMIT, MsgType.FILE_DATA: FILE_DATA_LIMIT,
               MsgType.PENDING: TABLE_LIMIT, MsgType.FETCH: TABLE_LIMIT,
               MsgType.POSTCOPY_PAGES: PAGES_LIMIT})
MAX_PAYLOAD = max(LIMITS.values())

# indexed by the type byte: the limit, or -1 for a byte that is not a message type
LIMIT_BY_BYTE: tuple[int, ...] = tuple(LIMITS.get(b, -1) for b in range(256))  # type: ignore[call-overload]


class ErrorCode(StrEnum):
    BAD_MAGIC = "bad-magic"
    BAD_TYPE = "bad-type"
    BAD_FLAGS = "bad-flags"
    TOO_LARGE = "too-large"
    BAD_SEQ = "bad-seq"
    BAD_CHECK = "bad-check"
    TRUNCATED = "truncated"
    BAD_PAYLOAD = "bad-payload"
    UNEXPECTED = "unexpected"
    VERSION = "version"
    AUTH = "auth"
    NAME = "name"
    QUOTA = "quota"
    DIGEST = "digest"
    MISSING_PAGE = "missing-page"
    RESTORE = "restore"
    BUSY = "busy"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """The stream or a message breaks the protocol. ``code`` is one of ErrorCode (what an
    ERROR message to the peer carries), ``reason`` says what exactly was wrong."""

    def __init__(self, code: str, reason: str):
        self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else code
        self.reason = reason
        self.messages: list = []
        super().__init__(f"{code}: {reason}")


def type_name(t: int) -> str:
    try:
        return MsgType(t).name
    except ValueError:
        return f"0x{t:02x}"
