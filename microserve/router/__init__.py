"""The programmable router: strategies are async Python over the engines' microserving APIs.

Never imports torch, the engine, the model or the KV cache: it speaks to engines over HTTP only."""
