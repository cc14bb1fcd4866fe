"""router.media: data: URLs, image checks (formats, corruption, pixel and byte caps, decompression
bombs), the model's vision spec, and URL fetching against a real local HTTP server (SSRF guard on
literal addresses, on names that resolve to loopback and at every redirect; the allow-list;
byte cap, timeout, redirects)."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import shutil
import threading
import time

import pytest
from PIL import Image

import router.media
from engine.multimodal import VisionGeometry
from engine.tokenizer import TINY_VL_DIR, Tokenizer
from router.media import (
    ImageLoader,
    MediaConfig,
    MediaError,
    UrlFetcher,
    decode_data_url,
    inspect_image,
    is_public_address,
    vision_spec,
)
from tests.router.media_server import IMAGE, media_server


def encoded(fmt: str, size: tuple[int, int] = (30, 20), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 90).save(out, fmt)
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def refused(fn, *args, **kwargs) -> MediaError:
    with pytest.raises(MediaError) as info:
        fn(*args, **kwargs)
    return info.value


# --------------------------------------------------------------------------------------------- data: URLs


def test_data_url_decodes_base64_images_only() -> None:
    assert decode_data_url("p", data_url(IMAGE), 1 << 20) == IMAGE
    assert decode_data_url("p", data_url(IMAGE, "image/jpeg").replace(",", ",\n", 1), 1 << 20) == IMAGE
    assert "not an image" in refused(decode_data_url, "p", data_url(IMAGE, "text/html"), 1 << 20).message
    assert "base64" in refused(decode_data_url, "p", "data:image/png,rawbytes", 1 << 20).message
    assert "invalid base64" in refused(decode_data_url, "p", "data:image/png;base64,@@@@", 1 << 20).message
    assert "no ','" in refused(decode_data_url, "p", "data:image/png;base64", 1 << 20).message
    too_big = refused(decode_data_url, "messages[0].content[2]", data_url(IMAGE), len(IMAGE) - 1)
    assert too_big.code == "image_too_large" and str(too_big).startswith("messages[0].content[2]: ")


# --------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_accepted_formats_report_height_and_width(fmt: str) -> None:
    assert inspect_image("p", encoded(fmt), 1 << 20) == (20, 30)


def test_corrupt_truncated_and_unsupported_images_are_refused() -> None:
    png_bytes = encoded("PNG", (200, 200), "L")
    assert refused(inspect_image, "p", b"not an image at all", 1 << 20).code == "invalid_image"
    truncated = refused(inspect_image, "p", png_bytes[: len(png_bytes) // 2], 1 << 20)
    assert truncated.code == "invalid_image" and "cannot be decoded" in truncated.message
    tiff = refused(inspect_image, "p", encoded("TIFF"), 1 << 20)  # Pillow reads it; the router does not
    assert "accepted format" in tiff.message


def test_pixel_cap_is_checked_before_decoding_so_a_bomb_costs_nothing() -> None:
    bomb = encoded("PNG", (8_000, 8_000), "1")  # 64 M pixels in a few kB
    assert len(bomb) < 100_000
    error = refused(inspect_image, "images[0]", bomb, 1 << 25)
    assert error.code == "image_too_large" and "8000x8000" in error.message
    assert inspect_image("p", encoded("PNG", (100, 100)), 100 * 100) == (100, 100)
    assert refused(inspect_image, "p", encoded("PNG", (100, 101)), 100 * 100).code == "image_too_large"


def test_loader_checks_bytes_pixels_and_aspect_ratio() -> None:
    loader = ImageLoader(MediaConfig(max_image_bytes=len(IMAGE)), VisionGeometry())

    async def scenario():
        good = await loader.load("images[0]", data=IMAGE)
        errors = []
        for kwargs in (
            {"data": IMAGE + b"\0"},
            {"data": b""},
            {"data": encoded("PNG", (2000, 5))},  # 400:1
            {"url": "ftp://example.com/cat.png"},
        ):
            with pytest.raises(MediaError) as info:
                await loader.load("images[1]", **kwargs)
            errors.append(info.value)
        await loader.close()
        return good, errors

    good, errors = asyncio.run(scenario())
    assert (good.height, good.width, good.data) == (48, 64, IMAGE)
    assert [e.code for e in errors] == ["image_too_large", "invalid_image", "invalid_image", "invalid_image_url"]
    assert "aspect ratio" in errors[2].message and "'ftp'" in errors[3].message


# --------------------------------------------------------------------------------------------- the model


def test_vision_spec_comes_from_the_preprocessor_config_and_the_router_flags() -> None:
    assert vision_spec("tiny", Tokenizer.tiny(), MediaConfig()) is None
    tokenizer = Tokenizer.for_model("tiny-vl")
    spec = vision_spec("tiny-vl", tokenizer, MediaConfig())
    assert spec is not None and spec.image_token_id == 380 and spec.geometry == VisionGeometry()
    tuned = vision_spec("tiny-vl", tokenizer, MediaConfig(image_min_pixels=28 * 28 * 4, image_max_pixels=28 * 28 * 64))
    assert tuned is not None and (tuned.geometry.min_pixels, tuned.geometry.max_pixels) == (3136, 50176)
    with pytest.raises(ValueError, match="leave no image size"):
        vision_spec("tiny-vl", tokenizer, MediaConfig(image_min_pixels=10_000, image_max_pixels=5_000))


def test_a_model_folder_s_config_must_name_the_tokenizer_s_image_token(tmp_path) -> None:
    shutil.copytree(TINY_VL_DIR, tmp_path, dirs_exist_ok=True)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 28 * 28 * 100, "merge_size": 2}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "ernie4_5_vl_moe", "image_token_id": 380}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    spec = vision_spec(str(tmp_path), tokenizer, MediaConfig())
    assert spec is not None and spec.image_token_id == 380 and spec.geometry.max_pixels == 78400
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "ernie4_5_vl_moe", "im_patch_id": 100295}))
    with pytest.raises(ValueError, match="names image token 100295, but the tokenizer's image placeholder is 380"):
        vision_spec(str(tmp_path), tokenizer, MediaConfig())


# --------------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # shared address space
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("239.255.255.250", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("::", False),
        ("::ffff:127.0.0.1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
    ],
)
def test_only_global_unicast_addresses_are_public(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_allow_list_entries_must_be_names_or_networks() -> None:
    MediaConfig(allowed_hosts=("images.internal", "10.0.0.0/8", "[::1]", "fd00::/8"))
    with pytest.raises(ValueError, match="neither a host name nor an IP network"):
        MediaConfig(allowed_hosts=("10.0.0.0/33",))


# --------------------------------------------------------------------------------------------- fetching


def fetch(config: MediaConfig, url: str) -> bytes | MediaError:
    async def scenario():
        fetcher = UrlFetcher(config)
        try:
            return await fetcher.fetch("messages[0].content[1]", url)
        except MediaError as err:
            return err
        finally:
            await fetcher.close()

    return asyncio.run(scenario())


def test_by_default_urls_to_loopback_private_and_link_local_hosts_are_refused() -> None:
    with media_server() as server:
        port = server.server_port
        urls = [
            f"http://127.0.0.1:{port}/img.png",
            f"http://localhost:{port}/img.png",  # a name that resolves to loopback
            f"http://[::1]:{port}/img.png",
            "http://10.0.0.1/img.png",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::ffff:127.0.0.1]/img.png",
            "https://0.0.0.0/img.png",
        ]
        results = [fetch(MediaConfig(), url) for url in urls]
        assert server.paths == []  # nothing ever reached the server
    for url, result in zip(urls, results, strict=True):
        assert isinstance(result, MediaError), url
        assert result.code == "image_url_refused" and result.where == "messages[0].content[1]", result
    assert "localhost resolves to 127.0.0.1" in results[1].message


def test_other_schemes_and_malformed_urls_are_refused() -> None:
    for url in ("file:///etc/passwd", "gopher://example.com/", "http://", "http://example.com:99999/x"):
        result = fetch(MediaConfig(), url)
        assert isinstance(result, MediaError) and result.code == "invalid_image_url", (url, result)


def test_allow_list_lifts_the_guard_for_named_hosts_but_not_for_redirects_elsewhere() -> None:
    with media_server() as server:
        port = server.server_port
        config = MediaConfig(allowed_hosts=("localhost",))
        assert fetch(config, f"http://localhost:{port}/img.png") == IMAGE
        # The allowed server redirects to a private address: the redirect is checked again.
        for target in (f"http://127.0.0.1:{port}/img.png", "http://10.0.0.1/img.png", f"http://[::1]:{port}/x"):
            result = fetch(config, f"http://localhost:{port}/redirect?to={target}")
            assert isinstance(result, MediaError) and result.code == "image_url_refused", (target, result)
        assert server.paths == ["/img.png"] + ["/redirect"] * 3
        # A network entry allows addresses in it, whatever name leads there.
        assert fetch(MediaConfig(allowed_hosts=("127.0.0.0/8",)), f"http://localhost:{port}/img.png") == IMAGE


def test_allow_private_urls_lifts_the_guard_and_redirects_are_followed() -> None:
    with media_server() as server:
        port = server.server_port
        config = MediaConfig(allow_private_urls=True)
        assert fetch(config, f"http://127.0.0.1:{port}/img.png") == IMAGE
        assert fetch(config, f"http://127.0.0.1:{port}/redirect?to=/img.png") == IMAGE
        loop = fetch(MediaConfig(allow_private_urls=True, max_redirects=3), f"http://127.0.0.1:{port}/loop")
        assert isinstance(loop, MediaError) and "more than 3 redirects" in loop.message
        missing = fetch(config, f"http://127.0.0.1:{port}/nothing.png")
        assert isinstance(missing, MediaError) and "HTTP 404" in missing.message
        closed = fetch(config, "http://127.0.0.1:1/img.png")
        assert isinstance(closed, MediaError) and closed.code == "image_fetch_failed"


def test_bodies_are_capped_while_streaming_and_fetches_time_out() -> None:
    with media_server() as server:
        port = server.server_port
        config = MediaConfig(allow_private_urls=True, max_image_bytes=100_000, fetch_timeout_s=1.0)
        assert fetch(config, f"http://127.0.0.1:{port}/stream?bytes=100000") == b"\0" * 100_000
        for path in ("/stream?bytes=100001", "/stream?bytes=50000000", "/huge"):
            result = fetch(config, f"http://127.0.0.1:{port}{path}")
            assert isinstance(result, MediaError) and result.code == "image_too_large", (path, result)
        slow = fetch(config, f"http://127.0.0.1:{port}/slow")
        assert isinstance(slow, MediaError) and "timed out after 1 s" in slow.message


def test_a_burst_of_images_is_decoded_a_few_at_a_time(monkeypatch) -> None:
    running, peak, lock = 0, 0, threading.Lock()

    def slow_inspect(where: str, data: bytes, max_pixels: int) -> tuple[int, int]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return 48, 64

    monkeypatch.setattr(router.media, "inspect_image", slow_inspect)
    loader = ImageLoader(MediaConfig(max_concurrent_decodes=2), VisionGeometry())

    async def scenario():
        return await asyncio.gather(*(loader.load(f"images[{i}]", data=IMAGE) for i in range(8)))

    assert len(asyncio.run(scenario())) == 8
    assert peak == 2
