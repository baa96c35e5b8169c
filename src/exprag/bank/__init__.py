"""The experience bank: storage, encoders, retrieval and memory-block rendering."""

from exprag.bank.memory import render_memory, render_trajectory
from exprag.bank.retriever import Filters, Hit, Retriever, approx_tokens
from exprag.bank.store import Bank, append_to_bank, build_bank, build_bank_from_files, load_bank

__all__ = [
    "Bank", "Filters", "Hit", "Retriever", "append_to_bank", "approx_tokens", "build_bank",
    "build_bank_from_files", "load_bank", "render_memory", "render_trajectory",
]
