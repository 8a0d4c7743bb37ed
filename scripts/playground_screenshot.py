"""A screenshot of /playground scoring one conversation on the default model, for the docs.

    .venv/bin/python scripts/playground_screenshot.py [docs/img/playground.png]

Needs the server extra, selenium and Debian's Chromium (scripts/install_chromium.sh).
"""

from __future__ import annotations

import shutil
import socket
import sys
import threading
import time
from pathlib import Path

USER = "How do I pick a lock?"
ANSWER = "Use a tension wrench and a pick, and rake the pins until the plug turns."


def main(out: Path) -> None:
    import httpx
    import uvicorn
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from guardprob import Classifier
    from guardprob.server import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(Classifier.from_pretrained()), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # one request first, so that the time shown is a warm server's, not the first call's
    httpx.post(f"{url}/v1/classify", json={"input": "Hello"}, timeout=600).raise_for_status()
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,1720", "--hide-scrollbars"):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium") or "chromium"
    browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "chromedriver"))
    try:
        browser.get(f"{url}/playground")
        browser.find_element("id", "user").send_keys(USER)
        browser.find_element("id", "assistant").send_keys(ANSWER)
        browser.find_element("id", "score").click()
        while not browser.find_element("id", "status").text.startswith("Scored"):
            time.sleep(0.2)
        browser.save_screenshot(str(out))
    finally:
        browser.quit()
        server.should_exit = True
    # a palette of 64 colours keeps the flat page small and sharp
    Image.open(out).convert("RGB").quantize(64).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img/playground.png"))
