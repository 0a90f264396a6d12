"""What `gateway demo` prints for a person to try."""

from __future__ import annotations

from gateway.demo import CURLS, DEMO_ADMIN_TOKEN


def test_the_demo_prints_the_operator_page_with_its_token_in_the_fragment() -> None:
    text = CURLS.format(bot="b", admin=DEMO_ADMIN_TOKEN)
    assert f"http://127.0.0.1:9901/admin/ui#token={DEMO_ADMIN_TOKEN}" in text
