"""Fixtures shared by the plugin tests."""

import pytest


@pytest.fixture
def spy(monkeypatch):
    """``spy(host, method_id)`` -> a list that records ``(state, decision)`` of every decision the
    VLM pruning method loaded by ``host`` takes (its ``decide`` wrapped, restored after the test)."""

    def install(host, method_id):
        method = host.load(method_id)
        seen = []
        original = method.decide

        def decide(state, params):
            decision = original(state, params)
            seen.append((state, decision))
            return decision

        monkeypatch.setattr(method, "decide", decide)
        return seen

    return install
