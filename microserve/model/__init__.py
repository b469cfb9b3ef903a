"""The Llama family (Llama, Mistral, Qwen2) as one PyTorch definition, and its weight loader."""
from microserve.model.llama import LlamaForCausalLM
from microserve.model.loader import load_model

__all__ = ["LlamaForCausalLM", "load_model"]
