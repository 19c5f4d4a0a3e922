"""The example agent of docker/compose.yaml: a plain openai-SDK program that knows nothing of Lightwire.

It is pointed at the sidecar by ``OPENAI_BASE_URL`` alone (``OPENAI_API_KEY`` must be set for the SDK; the
sidecar passes it on or ignores it). It asks a few questions, prints the answers and exits. A backend that is
still starting refuses connections or answers 503; like any robust agent it waits and tries again.
"""

import sys
import time

import openai

QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "What is 12 times 12?",
)
MODEL = "default"  # Lightwire serves its policy whatever name is asked for
STARTUP_WAIT_S = 600.0
RETRY_EVERY_S = 5.0
NOT_YET = (502, 503, 504)  # a backend that is starting or restarting; other errors are errors


def ask(client: openai.OpenAI, question: str) -> str:
    deadline = time.monotonic() + STARTUP_WAIT_S
    while True:
        try:
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=64
            )
            return reply.choices[0].message.content or ""
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            if isinstance(exc, openai.APIStatusError) and exc.status_code not in NOT_YET:
                raise
            if time.monotonic() > deadline:
                raise
            print(f"backend not ready ({exc.__class__.__name__}); retrying in {RETRY_EVERY_S:.0f} s", flush=True)
            time.sleep(RETRY_EVERY_S)


def main() -> int:
    client = openai.OpenAI(max_retries=0)  # OPENAI_BASE_URL and OPENAI_API_KEY come from the environment
    for question in QUESTIONS:
        print(f"Q: {question}\nA: {ask(client, question)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
