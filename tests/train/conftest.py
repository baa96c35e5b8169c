"""Training fixtures: a tiny random Llama-style model with the bundled SmolLM2 tokenizer, tokenizers
with other chat templates, real TWX expert trajectories and a real BM25 bank."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # 2 cores, shared with other developers

# Llama-3 style: headers, trimmed contents, <|eot_id|> ends a turn, no newline after it.
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral style: no system role (folded into the first user turn), " " + action + "</s>": the
# space is glued to the action's first token.
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = '' %}"
    "{%- set loop_messages = messages %}{%- endif %}<s>"
    "{%- for m in loop_messages %}{%- if m['role'] == 'user' %}"
    "{%- if loop.first and system %}{{ '[INST] ' + system + '\n\n' + m['content'] + ' [/INST]' }}"
    "{%- else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{ ' ' + m['content'] + '</s>' }}{%- endif %}{%- endfor %}"
)
# A template that rewrites actions: masks cannot be located, so the builder must refuse it.
REWRITING = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] | upper) + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# What each template trains after an action (the end-of-turn token), for the mask checks.
EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from exprag.llm.models import tiny_random_model

    return tiny_random_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def chatml_tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _variant(tok, template: str, specials: list[str]):
    from tokenizers import AddedToken

    t = copy.deepcopy(tok)
    t.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True)
    t.chat_template = template
    return t


@pytest.fixture(scope="session")
def tokenizers(chatml_tok) -> dict:
    return {
        "chatml": chatml_tok,
        "llama3": _variant(chatml_tok, LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
        "mistral": _variant(chatml_tok, MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"]),
    }


@pytest.fixture(scope="session")
def rewriting_tok(chatml_tok):
    return _variant(chatml_tok, REWRITING, [])


@pytest.fixture(scope="session")
def train_trajs(twx_trajs):
    train, _ = twx_trajs
    return train


@pytest.fixture(scope="session")
def short_trajs(train_trajs):
    """The shortest easy-game trajectories: cheap to train a tiny model on."""
    return [t for t in train_trajs if t.task_type in ("simonsays", "arithmetic")]


@pytest.fixture(scope="session")
def bank(train_trajs, tmp_path_factory):
    from exprag.bank import build_bank

    return build_bank(train_trajs, tmp_path_factory.mktemp("bank") / "bank", "bm25")


@pytest.fixture(scope="session")
def short_files(short_trajs, tmp_path_factory) -> dict:
    """The short trajectories on disk, and a BM25 bank built from them (train split only)."""
    from exprag.bank import build_bank
    from exprag.trajectory import write_jsonl

    d = tmp_path_factory.mktemp("short")
    write_jsonl(d / "train.jsonl", short_trajs)
    build_bank(short_trajs, d / "bank", "bm25")
    return {"trajectories": str(d / "train.jsonl"), "bank": str(d / "bank")}
