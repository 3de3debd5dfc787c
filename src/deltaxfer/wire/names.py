"""Names that arrive from the network and become paths: image files, sessions, image ids."""
import re

from .messages import MAX_IMAGE_NAME, MAX_SESSION_NAME, ErrorCode, ProtocolError

IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# first character alphanumeric: "." and ".." are not session names
SESSION_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# pid-N (N >= 1, no leading zero); shmem-N (N >= 0: CRIU numbers SysV shm segments from 0,
# e.g. pagemap-shmem-0.img for the first segment's key)
IMAGE_ID_RE = re.compile(r"pid-[1-9][0-9]{0,9}|shmem-(0|[1-9][0-9]{0,9})")


def check_image_name(name) -> str:
    """Return ``name`` if it may name an image file in a session's directory (FILE), else
    raise ProtocolError(name): CRIU's image names only, no path, no memory images."""
    if not isinstance(name, str):
        raise ProtocolError(ErrorCode.NAME, f"image file name must be a string, not {name!r}")
    if not name:
        raise ProtocolError(ErrorCode.NAME, "empty image file name")
    if len(name.encode("utf-8")) > MAX_IMAGE_NAME:
        raise ProtocolError(ErrorCode.NAME,
                            f"image file name of {len(name.encode())} bytes is over the limit "
                            f"of {MAX_IMAGE_NAME}: {name[:40]!r}...")
    if "/" in name or "\0" in name:
        raise ProtocolError(ErrorCode.NAME, f"image file name {name!r} contains a path")
    if ".." in name:
        raise ProtocolError(ErrorCode.NAME, f"image file name {name!r} contains '..'")
    if not IMAGE_NAME_RE.fullmatch(name):
        raise ProtocolError(ErrorCode.NAME,
                            f"image file name {name!r} is not a CRIU image name "
                            "([A-Za-z0-9][A-Za-z0-9._-]*)")
    if name.startswith(("pagemap-", "pages-")):
        raise ProtocolError(ErrorCode.NAME,
                            f"{name!r} is a memory image: its pages travel as PAGEMAP/PAGES, "
                            "not as a FILE")
    return name


def check_session_name(name) -> str:
    """Return ``name`` if it is a valid session name (1-64 of [A-Za-z0-9._-], first one
    alphanumeric), else raise ProtocolError(name)."""
    if not isinstance(name, str):
        raise ProtocolError(ErrorCode.NAME, f"session name must be a string, not {name!r}")
    if not 1 <= len(name) <= MAX_SESSION_NAME or not SESSION_NAME_RE.fullmatch(name):
        raise ProtocolError(ErrorCode.NAME,
                            f"session name {name[:80]!r} is not 1-{MAX_SESSION_NAME} characters "
                            "of [A-Za-z0-9._-] starting with a letter or digit")
    return name


def check_image_id(image_id) -> str:
    """Return ``image_id`` if it is ``pid-N`` or ``shmem-N``, else raise ProtocolError(name)."""
    if not isinstance(image_id, str) or not IMAGE_ID_RE.fullmatch(image_id):
        raise ProtocolError(ErrorCode.NAME,
                            f"memory image id {image_id!r} is not pid-N or shmem-N")
    return image_id
