"""Serving: the batching engine (cache, sampling, MTP speculation) and the OpenAI-compatible HTTP app."""

from dsv3_jax.serving.engine import Completion, Engine, EngineBusy, Event
from dsv3_jax.serving.sampling import RequestError, SamplingParams

__all__ = ["Completion", "Engine", "EngineBusy", "Event", "RequestError", "SamplingParams"]
