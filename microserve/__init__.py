"""microserve: LLM microserving with a programmable router.

Engines expose an OpenAI API plus fine-grained microserving APIs (prep_recv / remote_send /
start_generate); a router composes them into strategies such as data parallel, PD disaggregation,
balanced PD, cache-aware PD and KV-cache migration.
"""

__version__ = "0.1.0"
