"""Images in requests: where they come from, how they are checked, what the prompt builder gets.

Torch-free (the router imports it); Pillow decodes images to check them.

    ImagePart (bytes | data: URL | http(s) URL)
        ──▶ bytes          data: base64-decoded; http(s) fetched (timeout, byte cap, SSRF guard)
        ──▶ checked image  Pillow opens it (PNG, JPEG, WebP, GIF, BMP only), pixel cap before
                           decoding (decompression bombs), then decodes it fully; the patch grid
                           must exist under the model's geometry
        ──▶ ImageInput     bytes + height + width, for `engine.multimodal.expand_placeholders`

Limits (`MediaConfig`, router flags): images per request, bytes per image (encoded, as received
or fetched), pixels per image (decoded width x height). Every refusal is a `MediaError` naming
the part (`messages[0].content[1]`, `images[0]`); the front ends turn it into INVALID_ARGUMENT /
HTTP 400 and keep serving.

Fetching (`UrlFetcher`): http and https only, `max_redirects` redirects followed by hand so each
hop is checked again, no proxies from the environment, no content decoding (a compressed body
cannot expand past the cap), the body streamed and abandoned at `max_image_bytes`, the whole
fetch bounded by `fetch_timeout_s`. SSRF: unless `allow_private_urls`, a host is refused when it
is, or resolves to, an address that is not globally routable (private, loopback, link-local,
shared, reserved, unspecified) or is multicast; the check sits in the connection's resolver, so
the address checked is the address connected to (no DNS-rebinding gap). `allowed_hosts` names
host names, addresses or networks (CIDR) exempt from the check, e.g. an internal image store.

Resolution: `VisionSpec` is what the prompt builder needs of a model that sees images: its image
placeholder token and its `VisionGeometry`, read from the model folder's (or the preset's)
`preprocessor_config.json`, with the router's `image_min_pixels` / `image_max_pixels` (FastDeploy's
`--mm-processor-kwargs`) over the file's values. The geometry reaches the workers as each item's
patch grid; the prefill worker's image processor (configured from the same file) must make the
same grid, and refuses the image otherwise, so overrides must match the workers' settings.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import ipaddress
import json
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from PIL import Image

from engine.multimodal import ImageInput, VisionGeometry, geometry_from_preprocessor_config, image_grid
from engine.tokenizer import Tokenizer, model_dir

# Formats Pillow may open: the ones image processors read. Never EPS / PDF-like formats (EPS
# runs Ghostscript) or anything else Pillow can sniff.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK_BYTES = 64 << 10
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class MediaError(ValueError):
    """An image the router refuses. `where` names the request part; `code` is the OpenAI error code."""

    def __init__(self, where: str, message: str, code: str = "invalid_image") -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message
        self.code = code


@dataclass(frozen=True)
class MediaConfig:
    """Image limits and URL policy (router flags `--max-images-per-request` and friends)."""

    max_images_per_request: int = 8
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 1 << 25  # decoded width x height
    fetch_timeout_s: float = 10.0
    max_redirects: int = 5
    max_concurrent_fetches: int = 16
    max_concurrent_decodes: int = 4  # images decoded at once (each up to max_image_pixels x 4 bytes)
    allow_private_urls: bool = False
    allowed_hosts: tuple[str, ...] = ()  # host names, addresses or CIDR networks exempt from the SSRF check
    image_min_pixels: int | None = None  # None: the model's preprocessor_config.json
    image_max_pixels: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_images_per_request",
            "max_image_bytes",
            "max_image_pixels",
            "max_concurrent_fetches",
            "max_concurrent_decodes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.fetch_timeout_s > 0 or self.max_redirects < 0:
            raise ValueError(
                f"fetch_timeout_s must be > 0 and max_redirects >= 0, got {self.fetch_timeout_s}, {self.max_redirects}"
            )
        for name in ("image_min_pixels", "image_max_pixels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _parse_allowed(self.allowed_hosts)  # raises on a malformed entry

    @property
    def max_image_wire_bytes(self) -> int:
        """Most bytes one image may take in a request body: base64 in a data: URL, plus its header."""
        return -(-self.max_image_bytes // 3) * 4 + 1024


# --------------------------------------------------------------------------------------------
# The model's side: placeholder token and geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionSpec:
    """What prompt building needs of a model that sees images."""

    image_token_id: int
    geometry: VisionGeometry
    video_token_id: int | None = None  # refused in prompts: videos are not served


def vision_spec(model: str, tokenizer: Tokenizer, config: MediaConfig) -> VisionSpec | None:
    """The model's `VisionSpec`, or None for a text-only model (no preprocessor_config.json).

    Raises ValueError when the folder describes a vision model inconsistently (a processor
    config but no `image_token` in the tokenizer, or min_pixels above max_pixels)."""
    folder = model_dir(model)
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    processor = json.loads(path.read_text(encoding="utf-8"))
    image_token_id = tokenizer.special_token_id("image_token")
    if image_token_id is None:
        image_token_id = tokenizer.token_to_id("<|IMAGE_PLACEHOLDER|>")
    if image_token_id is None:
        raise ValueError(f"{path} describes an image processor, but the tokenizer has no image placeholder token")
    config_path = folder / "config.json"  # a model folder's: the id the model treats as an image's
    if config_path.is_file():
        model_config = json.loads(config_path.read_text(encoding="utf-8"))
        model_token_id = model_config.get("image_token_id", model_config.get("im_patch_id"))
        if model_token_id is not None and model_token_id != image_token_id:
            raise ValueError(
                f"{config_path} names image token {model_token_id}, but the tokenizer's image placeholder is "
                f"{image_token_id}: the chat template's placeholders would not reach the model as images"
            )
    geometry = geometry_from_preprocessor_config(processor)  # as the workers' image processor reads it
    overrides = {
        name: value
        for name, value in (("min_pixels", config.image_min_pixels), ("max_pixels", config.image_max_pixels))
        if value is not None
    }
    geometry = dataclasses.replace(geometry, **overrides)
    if geometry.min_pixels > geometry.max_pixels or geometry.max_pixels < geometry.factor**2:
        raise ValueError(
            f"image min_pixels {geometry.min_pixels} / max_pixels {geometry.max_pixels} leave no image size "
            f"(max_pixels must be >= {geometry.factor**2} and >= min_pixels)"
        )
    return VisionSpec(image_token_id, geometry, tokenizer.special_token_id("video_token"))


# --------------------------------------------------------------------------------------------
# Checking an image
# --------------------------------------------------------------------------------------------


def inspect_image(where: str, data: bytes, max_pixels: int) -> tuple[int, int]:
    """(height, width) of an encoded image, after decoding it fully. MediaError when it is not an
    image of an accepted format, is corrupt or truncated, or has more than `max_pixels` pixels
    (checked from the header, before any pixel is decoded)."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise MediaError(
                    where,
                    f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels",
                    "image_too_large",
                )
            image.load()  # decodes the (first frame's) pixels: truncated or corrupt data fails here
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(where, f"image exceeds the pixel limit: {exc}", "image_too_large") from None
    except Image.UnidentifiedImageError:
        raise MediaError(
            where, f"not an image in an accepted format ({', '.join(IMAGE_FORMATS)})", "invalid_image"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # what Pillow raises for broken files
        raise MediaError(where, f"the image cannot be decoded: {exc}", "invalid_image") from None
    if width < 1 or height < 1:
        raise MediaError(where, f"image has no pixels ({width}x{height})", "invalid_image")
    return height, width


def decode_data_url(where: str, url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise MediaError(where, "malformed data: URL (no ',')", "invalid_image_url")
    media_type, *params = header[len("data:") :].split(";")
    if media_type and not media_type.lower().startswith("image/"):
        raise MediaError(where, f"data: URL of type {media_type!r} is not an image", "invalid_image_url")
    if "base64" not in (p.lower() for p in params):
        raise MediaError(where, "data: URL must be base64-encoded (data:image/png;base64,...)", "invalid_image_url")
    payload = "".join(payload.split())
    if len(payload) > -(-max_bytes // 3) * 4:
        raise MediaError(where, f"image is larger than the limit of {max_bytes} bytes", "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(where, "data: URL holds invalid base64", "invalid_image_url") from None
    if len(data) > max_bytes:
        raise MediaError(
            where, f"image of {len(data)} bytes is larger than the limit of {max_bytes} bytes", "image_too_large"
        )
    return data


# --------------------------------------------------------------------------------------------
# Fetching, with the SSRF guard
# --------------------------------------------------------------------------------------------


def _parse_allowed(entries: tuple[str, ...]) -> tuple[frozenset[str], tuple[IpNetwork, ...]]:
    names: set[str] = set()
    networks: list[IpNetwork] = []
    for entry in entries:
        entry = entry.strip().lower()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            if "/" in entry or ":" in entry:
                raise ValueError(f"allowed image URL host {entry!r} is neither a host name nor an IP network") from None
            names.add(entry.rstrip("."))
    return frozenset(names), tuple(networks)


def is_public_address(address: IpAddress) -> bool:
    """Globally routable and unicast: what an image URL may reach by default."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class AddressPolicy:
    """Which addresses an image fetch may connect to (see the module doc)."""

    def __init__(self, config: MediaConfig) -> None:
        self.allow_all = config.allow_private_urls
        self.names, self.networks = _parse_allowed(config.allowed_hosts)

    def host_exempt(self, host: str) -> bool:
        return self.allow_all or host.lower().rstrip(".") in self.names

    def address_allowed(self, address: IpAddress) -> bool:
        return is_public_address(address) or any(address in network for network in self.networks)


class RefusedAddress(OSError):
    """A host that resolves to an address the policy refuses (raised inside the resolver)."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to {address}, which is not a public address")
        self.host = host
        self.address = address


class _GuardedResolver(aiohttp.ThreadedResolver):
    """Resolves like the default resolver, then refuses the whole answer if any address is not
    allowed: the connection only ever goes to addresses this checked."""

    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        self.policy = policy

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        results = await super().resolve(host, port, family)
        if not self.policy.host_exempt(host):
            for result in results:
                if not self.policy.address_allowed(ipaddress.ip_address(result["host"])):
                    raise RefusedAddress(host, result["host"])
        return results


class UrlFetcher:
    """Fetches image URLs for one router process. Owned by its asyncio loop; `close()` at exit."""

    def __init__(self, config: MediaConfig) -> None:
        self.config = config
        self.policy = AddressPolicy(config)
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(config.max_concurrent_fetches)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=_GuardedResolver(self.policy), use_dns_cache=False, limit=self.config.max_concurrent_fetches
            )
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False, headers={"Accept-Encoding": "identity"}
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, where: str, url: str) -> bytes:
        """The body of an http(s) URL: MediaError for a refused host, a failure, a timeout or a body
        over `max_image_bytes`."""
        async with self._slots:
            try:
                async with asyncio.timeout(self.config.fetch_timeout_s):
                    return await self._follow(where, url)
            except TimeoutError:
                raise MediaError(
                    where, f"fetching the image timed out after {self.config.fetch_timeout_s:g} s", "image_fetch_failed"
                ) from None

    async def _follow(self, where: str, url: str) -> bytes:
        for _ in range(self.config.max_redirects + 1):
            self._check_url(where, url)
            try:
                async with self._client().get(url, allow_redirects=False) as response:
                    if response.status in _REDIRECTS and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if response.status != 200:
                        raise MediaError(
                            where, f"fetching the image failed: HTTP {response.status}", "image_fetch_failed"
                        )
                    return await self._read_capped(where, response)
            except aiohttp.ClientConnectorError as exc:
                refused = exc.os_error if isinstance(exc.os_error, RefusedAddress) else exc.__cause__
                if isinstance(refused, RefusedAddress):
                    raise MediaError(where, f"image URL refused: {refused}", "image_url_refused") from None
                raise MediaError(where, f"fetching the image failed: {exc}", "image_fetch_failed") from None
            except aiohttp.ClientError as exc:
                raise MediaError(where, f"fetching the image failed: {exc}", "image_fetch_failed") from None
        raise MediaError(where, f"more than {self.config.max_redirects} redirects", "image_fetch_failed")

    def _check_url(self, where: str, url: str) -> None:
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018  (raises ValueError on a malformed port)
        except ValueError as exc:
            raise MediaError(where, f"malformed image URL: {exc}", "invalid_image_url") from None
        if parts.scheme not in ("http", "https"):
            raise MediaError(
                where, f"image URL scheme {parts.scheme!r} is not supported (http, https, data)", "invalid_image_url"
            )
        if not host:
            raise MediaError(where, "image URL has no host", "invalid_image_url")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return  # a name: the resolver checks every address it resolves to
        if not self.policy.host_exempt(host) and not self.policy.address_allowed(address):
            raise MediaError(where, f"image URL refused: {host} is not a public address", "image_url_refused")

    async def _read_capped(self, where: str, response: aiohttp.ClientResponse) -> bytes:
        cap = self.config.max_image_bytes
        too_large = MediaError(where, f"image is larger than the limit of {cap} bytes", "image_too_large")
        if response.content_length is not None and response.content_length > cap:
            raise too_large
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            body += chunk
            if len(body) > cap:
                raise too_large
        return bytes(body)


# --------------------------------------------------------------------------------------------
# The loader the router calls
# --------------------------------------------------------------------------------------------


class ImageLoader:
    """Turns one image part into a checked `ImageInput` (module doc). One per router process."""

    def __init__(self, config: MediaConfig, geometry: VisionGeometry) -> None:
        self.config = config
        self.geometry = geometry
        self.fetcher = UrlFetcher(config)
        self._decodes = asyncio.Semaphore(config.max_concurrent_decodes)

    async def close(self) -> None:
        await self.fetcher.close()

    async def load(self, where: str, *, data: bytes | None = None, url: str | None = None) -> ImageInput:
        """Exactly one of `data` (the encoded file) and `url` (data: or http(s))."""
        if url is not None:
            if url[:5].lower() == "data:":
                data = decode_data_url(where, url, self.config.max_image_bytes)
            else:
                data = await self.fetcher.fetch(where, url)
        if not data:
            raise MediaError(where, "the image is empty", "invalid_image")
        if len(data) > self.config.max_image_bytes:
            raise MediaError(
                where,
                f"image of {len(data)} bytes is larger than the limit of {self.config.max_image_bytes} bytes",
                "image_too_large",
            )
        # Decoding is CPU work: off the event loop, so other requests keep streaming meanwhile, and
        # a few at a time, so a burst of large images cannot hold many decoded frames in memory.
        async with self._decodes:
            height, width = await asyncio.to_thread(inspect_image, where, data, self.config.max_image_pixels)
        try:
            image_grid(height, width, self.geometry)
        except ValueError as exc:
            raise MediaError(where, str(exc), "invalid_image") from None
        return ImageInput(data, height, width)


__all__ = [
    "IMAGE_FORMATS",
    "ImageLoader",
    "MediaConfig",
    "MediaError",
    "UrlFetcher",
    "VisionSpec",
    "decode_data_url",
    "inspect_image",
    "is_public_address",
    "vision_spec",
]
