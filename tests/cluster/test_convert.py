"""cluster.convert for images: MultiModalItem <-> proto, bytes kept only where the prompt is
prefilled, and items a worker cannot use refused with a message naming them."""

from __future__ import annotations

import pytest

from cluster.convert import MultiModalError, mm_items_from_proto, mm_items_to_proto
from engine.multimodal import IMAGE, MultiModalItem, content_hash
from protos.pdserve.v1 import worker_pb2

RED, BLUE = b"\x89PNG red", b"\x89PNG blue"
ITEMS = (
    MultiModalItem(IMAGE, RED, content_hash(RED), (1, 4, 4), 3, 4),
    MultiModalItem(IMAGE, BLUE, content_hash(BLUE), (1, 8, 16), 9, 32),
)


def wire(items=ITEMS) -> list[worker_pb2.MultiModalItem]:
    """Through serialization, as a worker receives them."""
    request = worker_pb2.EngineRequest(mm_items=mm_items_to_proto(items))
    return list(worker_pb2.EngineRequest.FromString(request.SerializeToString()).mm_items)


def test_items_round_trip_with_their_bytes_for_the_prefilling_side():
    assert mm_items_from_proto(wire(), num_prompt_tokens=50) == ITEMS


def test_the_decode_side_keeps_everything_but_the_bytes():
    items = mm_items_from_proto(wire(), num_prompt_tokens=50, keep_data=False)
    assert items == tuple(item.without_data() for item in ITEMS)
    assert all(item.data == b"" and item.content_hash for item in items)


def test_bytes_that_do_not_match_their_hash_are_refused_where_they_are_kept():
    msgs = wire()
    msgs[1].data = b"tampered"
    with pytest.raises(MultiModalError, match=r"mm_items\[1\]: data does not match content_hash"):
        mm_items_from_proto(msgs, 50)
    assert mm_items_from_proto(msgs, 50, keep_data=False)[1].content_hash == content_hash(BLUE)
    msgs[1].data = b""  # a prefilling worker needs the bytes
    with pytest.raises(MultiModalError, match=r"mm_items\[1\]"):
        mm_items_from_proto(msgs, 50)


@pytest.mark.parametrize(
    ("edit", "num_prompt_tokens", "message"),
    [
        (lambda m: setattr(m[0], "modality", worker_pb2.MODALITY_UNSPECIFIED), 50, r"mm_items\[0\]: unknown modality"),
        (lambda m: setattr(m[1], "num_tokens", 0), 50, r"mm_items\[1\]: offset must be >= 0 and num_tokens > 0"),
        (lambda m: setattr(m[1], "offset", 5), 50, "ordered, disjoint and inside the prompt"),
        (lambda m: None, 40, "spans tokens \\[9, 41\\) of a 40-token prompt"),
    ],
)
def test_items_a_worker_cannot_place_are_refused(edit, num_prompt_tokens, message):
    msgs = wire()
    edit(msgs)
    with pytest.raises(MultiModalError, match=message):
        mm_items_from_proto(msgs, num_prompt_tokens)
