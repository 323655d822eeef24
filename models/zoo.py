"""The official FractalGen checkpoints (the model zoo) and their download.

`download_pretrained(name)` puts an official checkpoint at
`pretrained_models/<name>/checkpoint-last.pth`; `python util/download.py` is its command
line. Bytes are streamed into `checkpoint-last.pth.part`, which is renamed only once the
whole file has arrived, so a half-written checkpoint can never be mistaken for a good one.
An interrupted download (dropped connection, Ctrl-C) resumes from the `.part` file with
an HTTP Range request the next time; a server that ignores Range makes it start over
cleanly. Without a network (no DNS, no route) it stops at once with one line, leaving
nothing behind. Only the standard library and tqdm are used.
"""
import errno
import http.client
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

# Links from the official README. Their sizes are not published there; each download is
# checked against the Content-Length the server announces instead.
PRETRAINED_URLS = {
    "fractalar_in64": "https://www.dropbox.com/scl/fi/n25tbij7aqkwo1ypqhz72/checkpoint-last.pth"
                      "?rlkey=2czevgex3ocg2ae8zde3xpb3f&st=mj0subup&dl=1",
    "fractalmar_in64": "https://www.dropbox.com/scl/fi/lh7fmv48pusujd6m4kcdn/checkpoint-last.pth"
                       "?rlkey=huihey61ok32h28o3tbbq6ek9&st=fxtoawba&dl=1",
    "fractalmar_base_in256": "https://www.dropbox.com/scl/fi/zrdm7853ih4tcv98wmzhe/checkpoint-last.pth"
                             "?rlkey=htq9yuzovet7d6ioa64s1xxd0&st=4c4d93vs&dl=1",
    "fractalmar_large_in256": "https://www.dropbox.com/scl/fi/y1k05xx7ry8521ckxkqgt/checkpoint-last.pth"
                              "?rlkey=wolq4krdq7z7eyjnaw5ndhq6k&st=vjeu5uzo&dl=1",
    "fractalmar_huge_in256": "https://www.dropbox.com/scl/fi/t2rru8xr6wm23yvxskpww/checkpoint-last.pth"
                             "?rlkey=dn9ss9zw4zsnckf6bat9hss6h&st=y7w921zo&dl=1",
}
CHECKPOINT_NAME = "checkpoint-last.pth"
CHUNK_SIZE = 1 << 20  # 1 MiB per read keeps memory flat for multi-GB files


class DownloadError(RuntimeError):
    """A download that cannot succeed by simply retrying (HTTP error, wrong content)."""


class _Restart(Exception):
    """The .part file cannot be resumed; it has been removed and the download starts over."""


def direct_link(url):
    """Dropbox share links (`dl=0`) serve an HTML preview page; `dl=1` serves the file."""
    parts = urllib.parse.urlsplit(url)
    if not parts.netloc.endswith("dropbox.com"):
        return url
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "dl"]
    query.append(("dl", "1"))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _content_range(header):
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000); else (None, None)."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _open(url, have, timeout):
    """Open `url`, asking for bytes from `have` on. Returns (response, resuming: bool);
    None when the server says the .part file is already the complete file."""
    request = urllib.request.Request(url, headers={"User-Agent": "fractalgen-download/1.0"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # Range starts at or past the end of the file
            _, total = _content_range(e.headers.get("Content-Range"))
            if total == have:
                return None
            raise _Restart(f"server rejected resuming at byte {have}")
        raise DownloadError(f"HTTP {e.code} {e.reason} for {url}; check the URL or model name "
                            f"(and that the file is still online), then retry.") from None
    content_type = response.headers.get("Content-Type", "")
    if content_type.startswith("text/html"):
        response.close()
        raise DownloadError(f"{url} returned an HTML page instead of the file; for Dropbox "
                            f"links make sure the URL ends in dl=1.")
    if have and response.status == 206:
        start, _ = _content_range(response.headers.get("Content-Range"))
        if start != have:
            response.close()
            raise _Restart(f"server resumed at byte {start}, expected {have}")
        return response, True
    return response, False  # 200: the server ignored Range and sends the whole file


def _fetch(url, part, timeout, chunk_size, progress, desc, progress_bar):
    """One attempt: stream (the rest of) `url` into `part`. Returns normally only when the
    file is complete; raises OSError/HTTPException on a dropped connection."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    opened = _open(url, have, timeout)
    if opened is None:
        return
    response, resuming = opened
    with response:
        if not resuming:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        # the folder appears only once bytes arrive: a failed first request leaves nothing
        os.makedirs(os.path.dirname(os.path.abspath(part)), exist_ok=True)
        with open(part, "ab" if resuming else "wb") as f, \
                progress_bar(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=desc, disable=not progress) as bar:
            while chunk := response.read(chunk_size):
                f.write(chunk)
                bar.update(len(chunk))
    size = os.path.getsize(part)
    if total is not None and size < total:
        # http.client returns b"" instead of raising when the peer closes early
        raise ConnectionError(f"connection closed after {size} of {total} bytes")
    if total is not None and size > total:
        os.remove(part)
        raise _Restart(f"received {size} bytes but the server announced {total}")


def download_file(url, dest, *, retries=5, timeout=60.0, backoff=2.0, chunk_size=CHUNK_SIZE,
                  progress=True, overwrite=False, progress_bar=tqdm):
    """Download `url` to `dest` atomically (through `dest + '.part'`), resuming after
    dropped connections with HTTP Range. Returns `dest`.

    An existing `dest` is kept unless `overwrite`. Dropped connections are retried up to
    `retries` times (waiting backoff * attempt seconds); the .part file is left in place
    when all attempts fail, so running again resumes. HTTP errors raise DownloadError at once.
    progress_bar: the bar (tqdm's signature; util.progress.progress_bar writes whole lines
    to log files).
    """
    dest = os.fspath(dest)
    if os.path.exists(dest) and not overwrite:
        return dest
    part = dest + ".part"
    url = direct_link(url)
    desc = os.path.basename(os.path.dirname(os.path.abspath(dest))) or os.path.basename(dest)
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout, chunk_size, progress, desc, progress_bar)
            os.replace(part, dest)
            return dest
        except _Restart as e:
            reason = e
            if os.path.exists(part):
                os.remove(part)
        except (OSError, http.client.HTTPException) as e:  # drops, resets, timeouts
            if is_offline(e):  # retrying cannot help: say so at once
                raise DownloadError(f"cannot reach {urllib.parse.urlsplit(url).hostname} ({_reason(e)}); "
                                    f"check the network connection, then run the same command again.") from None
            reason = e
        if attempt < retries:
            print(f"download interrupted ({reason}); retrying ({attempt + 1}/{retries})", file=sys.stderr)
            time.sleep(backoff * (attempt + 1))
    again = (f"run the same command again to resume from {part}" if os.path.exists(part)
             else "run the same command again")
    raise DownloadError(f"could not download {url} after {retries + 1} attempts ({reason}); {again}.")


OFFLINE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}


def is_offline(error):
    """True for failures that mean no network at all: DNS lookup failed, no route."""
    reason = getattr(error, "reason", error)  # urllib wraps socket errors in URLError
    return isinstance(reason, socket.gaierror) or getattr(reason, "errno", None) in OFFLINE_ERRNOS


def _reason(error):
    reason = getattr(error, "reason", error)
    return getattr(reason, "strerror", None) or str(reason)


def checkpoint_path(name, root="pretrained_models"):
    """Where `download_pretrained(name, root)` puts the checkpoint."""
    return os.path.join(root, name, CHECKPOINT_NAME)


def download_pretrained(name, root="pretrained_models", **kwargs):
    """Fetch an official checkpoint into root/<name>/checkpoint-last.pth (kept if present)."""
    if name not in PRETRAINED_URLS:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of {', '.join(PRETRAINED_URLS)}.")
    dest = checkpoint_path(name, root)
    if os.path.exists(dest) and not kwargs.get("overwrite"):
        print(f"{dest} already exists; skipping (pass --overwrite to fetch it again)", file=sys.stderr)
        return dest
    print(f"downloading {name} -> {dest}", file=sys.stderr)
    return download_file(PRETRAINED_URLS[name], dest, **kwargs)
