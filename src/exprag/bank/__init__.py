"""The experience bank: storage, encoders, retrieval and memory-block rendering."""

from exprag.bank.memory import fit_memory, render_memory, render_trajectory
from exprag.bank.retriever import Filters, Hit, Retriever, approx_tokens, memory_block, token_counter
from exprag.bank.store import Bank, append_to_bank, build_bank, build_bank_from_files, load_bank

__all__ = [
    "Bank", "Filters", "Hit", "Retriever", "append_to_bank", "approx_tokens", "build_bank",
    "build_bank_from_files", "fit_memory", "load_bank", "memory_block", "render_memory",
    "render_trajectory", "token_counter",
]
