"""Fetching dataset archives: resumable, retrying, checksummed HTTP(S) downloads (standard library only).

A download streams into `<cache>/<name>.part` and is renamed to `<cache>/<name>` only once it
is complete (and its checksum matches, when one is given). The cache lives outside the DVC outputs,
so a partial file survives an interrupted `dvc repro` and the next run resumes it with an HTTP
Range request.

`file://` URLs and plain paths are used in place (never copied).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

CHUNK = 1 << 20
USER_AGENT = "elmm-pipeline/1 (+urllib)"
# Worth retrying: the server or the network may recover. Other 4xx codes are the caller's mistake.
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    """A download that failed for good (after retries, or on a non-transient error)."""


class ChecksumError(DownloadError):
    """The file's sha256 differs from the expected one."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_remote(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme.lower() in ("http", "https")


def local_path(url: str) -> Path:
    """The filesystem path of a `file://` URL or a plain path; ValueError for other schemes."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{url}: a file:// URL must name a local path (file:///abs/path), not host {parts.netloc!r}")
        return Path(urllib.request.url2pathname(parts.path))
    # A one-letter "scheme" is a Windows drive letter, i.e. a plain path.
    if scheme and len(scheme) > 1:
        raise ValueError(f"{url}: unsupported URL scheme {scheme!r} (use https://, http://, file:// or a local path)")
    return Path(url)


def cache_name(url: str) -> str:
    """A stable, filesystem-safe file name for `url`: a short hash (distinct URLs never clash) + its basename."""
    base = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "download"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[:100]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"


def verify_sha256(path: Path, expected: str | None, what: str) -> str:
    """Hash `path`; raise ChecksumError if `expected` is given and differs. Returns the hash."""
    actual = sha256_file(path)
    if expected and actual.lower() != expected.lower():
        raise ChecksumError(f"{what}: sha256 mismatch: expected {expected.lower()}, got {actual}")
    return actual


def fetch(
    url: str,
    cache_dir: str | os.PathLike,
    sha256: str | None = None,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    max_backoff: float = 60.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download `url` into `cache_dir` and return the complete file's path.

    A complete file already in the cache is reused (after checking `sha256`, when given). A partial
    one is resumed. Transient failures (connection errors, timeouts, short reads, HTTP 408/429/5xx)
    are retried up to `retries` times in a row without progress, sleeping backoff * 2**n seconds
    (capped at `max_backoff`). A checksum mismatch deletes the file and raises ChecksumError.
    """
    if not is_remote(url):
        raise ValueError(f"{url}: not an http(s) URL")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / cache_name(url)
    part = final.with_name(final.name + ".part")

    if final.is_file():
        try:
            verify_sha256(final, sha256, f"{url} (cached as {final})")
            return final
        except ChecksumError:
            final.unlink()  # a stale or damaged cached copy: download afresh

    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            if _attempt(url, part, timeout, progress):
                break
            raise _Transient("the server closed the connection before the end of the file")
        except _Transient as e:
            reason = str(e)
        except urllib.error.HTTPError as e:
            if e.code not in TRANSIENT_HTTP:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            reason = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            reason = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        after = part.stat().st_size if part.exists() else 0
        # Count only failures in a row without progress, so a long download over a flaky link
        # still finishes while a dead server gives up after `retries` attempts.
        failures = 1 if after > before else failures + 1
        if failures > retries:
            raise DownloadError(f"{url}: giving up after {retries} retries ({reason}); the partial file {part} is kept "
                                "and the next run resumes it")
        delay = min(max_backoff, backoff * 2 ** (failures - 1))
        print(f"download: {url}: {reason}; retrying in {delay:.1f} s ({failures}/{retries})", flush=True)
        time.sleep(delay)

    try:
        verify_sha256(part, sha256, url)
    except ChecksumError:
        part.unlink()  # a wrong file must not be resumed or reused
        raise
    os.replace(part, final)
    return final


class _Transient(Exception):
    """A failure worth retrying."""


def _attempt(url: str, part: Path, timeout: float, progress: bool) -> bool:
    """One request, appending to `part`. True when the file is complete."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Range not satisfiable: either the part is already complete or it is longer than the file.
            total = _total_from_content_range(e.headers.get("Content-Range", ""))
            e.close()
            if total == offset:
                return True
            part.unlink()
            raise _Transient(f"HTTP 416 for a resume at byte {offset}; restarting from the beginning") from None
        raise
    with resp:
        if offset and resp.status == 206:
            start = _start_from_content_range(resp.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink()
                raise _Transient(f"the server resumed at byte {start}, not {offset}; restarting")
            mode = "ab"
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
        else:
            # A 200 to a Range request means the server ignores ranges: start over.
            offset, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
        written = offset
        with open(part, mode) as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"download {cache_name(url)[13:]}", disable=not progress,
        ) as bar:  # fmt: skip
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    # urllib returns a short body without error when the connection drops: compare with the length.
    return total is None or written >= total


def _start_from_content_range(value: str) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", value)
    return int(m.group(1)) if m else None


def _total_from_content_range(value: str) -> int | None:
    m = re.match(r"\s*bytes\s+(?:\d+-\d+|\*)/(\d+)", value)
    return int(m.group(1)) if m else None
