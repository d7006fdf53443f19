"""The chat page in headless Chromium (Debian's `chromium`, driven by Playwright): a person sends
a message to the real policy, presses thumbs-up on the answer, and the FeedbackEvent is in Kafka.
Needs `apt-get install -y chromium` (.ci/run does it)."""

from __future__ import annotations

import httpx
from playwright.sync_api import sync_playwright

from services.common import topics
from services.genproto.rlhf.v1 import events_pb2
from tests.integration.gateway.gateway_process import read_topic

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_thumbs_up_in_the_browser_reaches_kafka(chat_gateway, kafka_settings):
    assert httpx.get(f"{chat_gateway.url}/ui/config").json() == {"dev_api_key": None}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"{chat_gateway.url}/")  # redirects to the page under /ui/
            page.fill("#api-key", chat_gateway.api_key)
            page.fill("#prompt", "What is a reward model?")
            page.click("#send")
            answer = page.wait_for_selector(".turn.assistant .feedback", timeout=120_000)
            response_id = answer.get_attribute("data-response-id")
            assert response_id
            page.click(".turn.assistant .thumb-up")
            page.wait_for_selector(".turn.assistant .result.sent", timeout=30_000)
            feedback_id = answer.get_attribute("data-feedback-id")
        finally:
            browser.close()

    events = read_topic(
        kafka_settings,
        topics.FEEDBACK,
        events_pb2.FeedbackEvent,
        lambda found: any(e.feedback_id == feedback_id for e in found),
    )
    (event,) = [e for e in events if e.feedback_id == feedback_id]
    assert (event.response_id, event.thumb) == (response_id, events_pb2.THUMB_UP)
