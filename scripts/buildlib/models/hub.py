"""Where an entry's bytes come from: the Hugging Face Hub (through huggingface_hub: endpoint, auth, URL resolution,
the LFS sha256), Civitai (its download URL and published hash) or a plain URL. Imports httpx2: only fetch and lock
load it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx2  # the HTTP client huggingface_hub 2.x ships with

from ..manifest import CivitaiSource, HfSource, ModelEntry, UrlSource
from .config import PROG, FetchConfig
from .errors import TRANSIENT_STATUS, FetchError, Transient
from .plan import Target


@dataclass(frozen=True)
class Remote:
    """Where the bytes of one entry come from right now (signed CDN URLs expire: resolved per attempt)."""

    url: str
    headers: dict[str, str] = field(repr=False)
    size: int | None = None
    sha256: str | None = None
    sha256_origin: str = ""
    commit: str | None = None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class Sources:
    """Resolves an entry to a :class:`Remote` using huggingface_hub for the Hub, plain HTTP elsewhere."""

    def __init__(self, cfg: FetchConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.log = log

    def resolve(self, t: Target) -> Remote:
        src = t.entry.source
        if isinstance(src, HfSource):
            return self._hf(t, src)
        if isinstance(src, CivitaiSource):
            url = f"{self.cfg.civitai_endpoint}/api/download/models/{src.version_id}"
            return Remote(url, _bearer(t.token), t.entry.size)
        assert isinstance(src, UrlSource)
        return Remote(src.url, _bearer(t.token), t.entry.size)

    def _hf(self, t: Target, src: HfSource) -> Remote:
        from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

        endpoint = self.cfg.hf_endpoint
        token: str | bool = t.token or False  # never the library's implicit token: only what the manifest names
        url = hf_hub_url(src.repo, src.file, revision=src.revision, repo_type=src.repo_type, endpoint=endpoint)
        try:
            meta = get_hf_file_metadata(url, token=token, endpoint=endpoint, retry_on_errors=True,
                                        timeout=self.cfg.timeout_s)
            infos = HfApi(endpoint=endpoint).get_paths_info(
                src.repo, [src.file], revision=meta.commit_hash or src.revision, repo_type=src.repo_type,
                token=token)
        except Exception as exc:  # noqa: BLE001 - mapped to one line below
            raise _hf_error(exc, t, src) from None
        info = next((i for i in infos if getattr(i, "path", None) == src.file), None)
        lfs = getattr(info, "lfs", None)
        hub_sha = lfs.sha256.lower() if lfs is not None else None
        size = getattr(info, "size", None) or meta.size
        if hub_sha and meta.etag and len(meta.etag) == 64 and meta.etag.lower() != hub_sha:
            self.log(f"{PROG}: warning: {t.entry.label}: the resolve ETag {meta.etag} disagrees with the hub's LFS "
                     f"sha256 {hub_sha}; trusting the LFS metadata")
        if meta.size is not None and size is not None and meta.size != size:
            self.log(f"{PROG}: warning: {t.entry.label}: the resolve response announces {meta.size} bytes, the hub's "
                     f"file metadata {size}; using {size}")
        headers = _bearer(t.token) if _origin(meta.location) == _origin(endpoint) else {}
        return Remote(meta.location, headers, size, hub_sha, "the hub's LFS metadata", meta.commit_hash)


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _hf_error(exc: Exception, t: Target, src: HfSource) -> Exception:
    """One line for a hub failure, saying what to do; retryable network failures become Transient."""
    from huggingface_hub import errors

    where = f"{t.entry.label}: {src.describe()}"
    auth = (f"the token from secret {t.token_name} was sent" if t.token else
            "no token was sent (name one in the entry's 'secret' field)")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return FetchError(f"{where}: HF_HUB_OFFLINE is set; unset it to download")
    if isinstance(exc, errors.GatedRepoError):
        return FetchError(f"{where}: the repository is gated; {auth}; accept its conditions on the Hub with the "
                          "token's account")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return FetchError(f"{where}: repository not found or not accessible; {auth}")
    if isinstance(exc, errors.RevisionNotFoundError):
        return FetchError(f"{where}: revision {src.revision!r} does not exist")
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return FetchError(f"{where}: file {src.file!r} does not exist at revision {src.revision!r}")
    if isinstance(exc, errors.HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = response.status_code if response is not None else "?"
        if status in TRANSIENT_STATUS:
            return Transient(f"the hub answered {status}")
        return FetchError(f"{where}: the hub answered {status}")
    if isinstance(exc, (httpx2.TransportError, OSError)):
        return Transient(f"cannot reach the hub: {type(exc).__name__}: {exc}")
    return FetchError(f"{where}: {type(exc).__name__}: {exc}")


def civitai_sha256(e: ModelEntry, src: CivitaiSource, token: str | None, cfg: FetchConfig) -> str:
    """Civitai publishes each file's SHA256 in its public model-version API."""
    url = f"{cfg.civitai_endpoint}/api/v1/model-versions/{src.version_id}"
    try:
        with httpx2.Client(timeout=cfg.timeout_s, follow_redirects=True) as client:
            r = client.get(url, headers=_bearer(token))
    except httpx2.TransportError as exc:
        raise FetchError(f"{e.label}: cannot reach {cfg.civitai_endpoint}: {type(exc).__name__}: {exc}") from None
    if r.status_code != 200:
        raise FetchError(f"{e.label}: {url} answered {r.status_code}")
    files = r.json().get("files") or []
    chosen = next((f for f in files if f.get("primary")), files[0] if files else None)
    sha = ((chosen or {}).get("hashes") or {}).get("SHA256")
    if not sha:
        raise FetchError(f"{e.label}: Civitai lists no SHA256 for model version {src.version_id}")
    return sha.lower()
