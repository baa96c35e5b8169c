"""The experience bank: storage, encoders and retrieval (the memory block is rendered by exprag.memory_block)."""

from exprag.bank.retriever import Filters, Hit, Retriever
from exprag.bank.store import Bank, append_to_bank, build_bank, build_bank_from_files, load_bank

__all__ = ["Bank", "Filters", "Hit", "Retriever", "append_to_bank", "build_bank", "build_bank_from_files", "load_bank"]
