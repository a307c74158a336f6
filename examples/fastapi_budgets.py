"""A FastAPI endpoint with a budget per user: each user may spend $0.01 a day; past it the
endpoint answers 429 with when the budget resets. Offline against llmguard's fake provider
(driven by FastAPI's TestClient), or the real API when OPENAI_API_KEY is set.

    pip install fastapi uvicorn
    python examples/fastapi_budgets.py            # offline demo requests
    uvicorn examples.fastapi_budgets:app          # serve it
"""

from __future__ import annotations

import os

from fastapi import FastAPI, HTTPException
from openai import AsyncOpenAI

import llmguard
from llmguard.testing import FakeLLMServer

ANSWER = "A considered answer. " * 70  # ~280 tokens, like a real one
fake = None if os.environ.get("OPENAI_API_KEY") else FakeLLMServer(reply=lambda r: ANSWER).start()
client = llmguard.instrument(
    AsyncOpenAI(max_retries=0)
    if fake is None
    else AsyncOpenAI(base_url=fake.openai_base_url, api_key="offline", max_retries=0)
)
app = FastAPI()


@llmguard.budget(usd="0.01", per="day", name="per-user", key=lambda user, question, **_: user)
@llmguard.retry_on_rate_limit(max_tries=4)
async def answer(user: str, question: str, *, model: str = "gpt-4o", max_tokens: int = 300) -> str:
    response = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens
    )
    return response.choices[0].message.content or ""


@app.get("/ask")
async def ask(user: str, question: str) -> dict[str, str]:
    try:
        return {"answer": await answer(user, question)}
    except llmguard.BudgetExceeded as exc:
        raise HTTPException(
            status_code=429,
            detail=f"daily budget used: ${exc.spent_usd:f} of ${exc.limit_usd:f}; "
            f"resets {exc.resets_at}",
        ) from None


if __name__ == "__main__":
    from fastapi.testclient import TestClient

    llmguard.reset_budget("per-user", key="alice")
    with TestClient(app) as http:
        for i in range(6):
            response = http.get("/ask", params={"user": "alice", "question": f"Question {i}?"})
            print("alice", response.status_code, str(response.json())[:90])
        response = http.get("/ask", params={"user": "bob", "question": "Question 0?"})
        print("bob  ", response.status_code, str(response.json())[:90])
    if fake is not None:
        fake.stop()
