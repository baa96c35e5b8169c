"""The episode loop on real TWX with a tiny random model (mechanics) — static and dynamic."""

import pytest

from exprag.agent import Agent, AgentConfig
from exprag.bank import Retriever, build_bank
from exprag.envs import make_env
from exprag.envs.base import parse_action
from exprag.memory_block import MemorySpec


@pytest.mark.parametrize("reply, action", [
    ("open door to north", "open door to north"),
    ("  Action: take coin.\nbecause", "take coin"),
    ("> move south", "move south"),
    ('"look around"', "look around"),
    ("1. read map", "read map"),
    ("\n\n", None),
    ("", None),
])
def test_parse_action(reply, action):
    assert parse_action(reply) == action


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from exprag.llm.hf import HFChatModel
    from exprag.llm.models import tiny_random_model

    path = tiny_random_model(tmp_path_factory.mktemp("tiny") / "model")
    return HFChatModel(str(path), max_batch_size=4)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_episodes_record_trajectories(tiny_model, twx_trajs, tmp_path, mode):
    train, _ = twx_trajs
    bank = build_bank(train, tmp_path / "bank", "bm25")
    envs = [make_env("twx"), make_env("twx")]
    try:
        tasks = [t for g in ("coin", "simonsays") for t in envs[0].tasks("test", [g])[:1]] + \
                envs[0].tasks("test", ["twc"])[:1]
        agent = Agent(tiny_model, Retriever(bank),
                      AgentConfig(memory=MemorySpec(k=2, mode=mode), max_steps=3, max_new_tokens=8))
        results = list(agent.run(envs, tasks))
    finally:
        for e in envs:
            e.close()
    assert sorted(r.task.task_id for r in results) == sorted(t.task_id for t in tasks)
    for r in results:
        traj = r.trajectory
        assert traj.num_steps == 3 and len(traj.actions()) == 3
        assert traj.source == tiny_model.name and traj.split == "test"
        assert r.stats["retrievals"] == (1 if mode == "static" else 3)
        assert len(r.stats["memory_ids"]) == 2
        assert r.stats["prompt_tokens"] >= r.stats["prefill_tokens"] > 0
        assert "invalid_actions" in r.stats
    if mode == "static":
        # The growing prefix is served from the KV cache: later steps prefill only new tokens.
        assert all(r.stats["prefill_tokens"] < r.stats["prompt_tokens"] for r in results)


@pytest.fixture(scope="module")
def sw_bank(tmp_path_factory):
    from exprag.expert import run_expert

    with make_env("scienceworld") as env:
        train = [t for g in ("find-plant", "find-animal") for t in env.tasks("train", [g])[:2]]
        return build_bank([run_expert(env, t) for t in train], tmp_path_factory.mktemp("sw") / "bank", "bm25")


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_scienceworld_episodes_through_openai_server(tiny_model, sw_bank, mode):
    """A real OpenAI-compatible server on loopback around the tiny model; real ScienceWorld."""
    from exprag.llm import load_chat_model
    from exprag.llm.server import ChatServer

    bank = sw_bank
    with ChatServer(tiny_model, port=0).start() as server:
        client = load_chat_model(tiny_model.name, backend="openai", base_url=server.url)
        env = make_env("scienceworld", gold=False)
        try:
            task = env.tasks("test", ["find-plant"])[0]
            agent = Agent(client, Retriever(bank),
                          AgentConfig(memory=MemorySpec(k=2, mode=mode), max_steps=2, max_new_tokens=6))
            (result,) = list(agent.run([env], [task]))
        finally:
            env.close()
    traj = result.trajectory
    assert traj.env == "scienceworld" and traj.num_steps == 2 and traj.task_type == "find-plant"
    assert result.stats["retrievals"] == (1 if mode == "static" else 2)
    assert result.stats["completion_tokens"] > 0


def test_token_budget_at_inference_counts_with_the_models_tokenizer(tiny_model, twx_trajs, tmp_path):
    from exprag.memory_block import memory_block, token_counter

    train, _ = twx_trajs
    r = Retriever(build_bank(train, tmp_path / "bank", "bm25"))
    count = token_counter(tiny_model.tokenizer)
    stats = {}
    with make_env("twx") as env:
        task = env.tasks("test", ["coin"])[0]
        full = count(memory_block(r.retrieve(env.reset(task).task, k=2)))
        for budget in (None, full // 2):
            agent = Agent(tiny_model, r, AgentConfig(memory=MemorySpec(k=2, token_budget=budget), max_steps=1,
                                                     max_new_tokens=4))
            (res,) = agent.run([env], [task])
            stats[budget] = res.stats
    cut = stats[full // 2]
    assert cut["memory_ids"] == stats[None]["memory_ids"]  # shortened, not swapped
    assert cut["memory_token_count"] == "tokenizer" and "memory_token_count" not in stats[None]
    # one step: the prompt is the system prompt + the first observation; the memory lost >= full/2 tokens
    assert stats[None]["prompt_tokens"] - cut["prompt_tokens"] >= full - full // 2 - 8


def test_agent_replays_an_episode_lost_to_a_jvm_restart(tiny_model):
    """The ScienceWorld JVM dies once the episode has started (reset done, before its first step: while
    the model writes the first reply): the episode starts over on a new JVM and runs to its cap."""
    env = make_env("scienceworld", gold=False)
    seen: dict[str, int] = {}

    class KillsTheJvmOnItsFirstReply:
        """The real tiny model; its first generate() kills the env's JVM (deterministic, no thread race)."""

        name = tiny_model.name

        def generate(self, conversations, **kw):
            if not seen:
                seen["steps"] = env._steps
                proc = env._sw._gateway.java_process
                seen["pid"] = proc.pid
                proc.kill()
                proc.wait()
            return tiny_model.generate(conversations, **kw)

        def end_session(self, session_id):
            tiny_model.end_session(session_id)

    try:
        task = env.tasks("test", ["find-plant"])[0]
        agent = Agent(KillsTheJvmOnItsFirstReply(), None,
                      AgentConfig(memory=MemorySpec(k=0), max_steps=3, max_new_tokens=6))
        (result,) = list(agent.run([env], [task]))
        new = env._sw._gateway.java_process
    finally:
        env.close()
    assert seen["steps"] == 0 and new.pid != seen["pid"]
    traj = result.trajectory
    assert traj.num_steps == 3 and traj.task_id == task.task_id and len(traj.messages) == 7
