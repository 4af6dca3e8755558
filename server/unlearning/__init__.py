"""Unlearning backends the engine applies per request: ULD assistants and UOE expert patches."""
