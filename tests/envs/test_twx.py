from exprag.envs import make_env
from exprag.envs.splits import all_types
from exprag.errors import EnvError, UnknownTaskTypeError

import pytest


def test_games_and_folds():
    with make_env("twx") as env:
        assert sorted(env.task_types()) == sorted(all_types("twx"))
        train, test = env.tasks("train", ["coin"]), env.tasks("test", ["coin"])
        assert len(train) > 100 and len(test) > 100
        assert not {t.task_id for t in train} & {t.task_id for t in test}
        with pytest.raises(UnknownTaskTypeError):
            env.tasks("train", ["nope"])
        with pytest.raises(EnvError, match="unknown split"):
            env.tasks("valid", ["coin"])


def test_gold_replay_all_games(twx_trajs):
    train, test = twx_trajs
    assert len(train) == 24 and len(test) == 16
    for t in train + test:
        assert t.success, t.id
        assert t.num_steps == len(t.actions()) > 0
        assert t.messages[0]["role"] == "user" and t.task in t.messages[0]["content"]
        assert t.env_version.startswith("textworld-express==")


def test_bad_action_and_task():
    with make_env("twx") as env:
        task = env.tasks("train", ["coin"])[0]
        env.reset(task)
        step = env.step("dance wildly")
        assert not step.won and isinstance(step.observation, str)
        assert env.admissible_actions()
        with pytest.raises(EnvError, match="not of the form"):
            env.reset(type(task)("twx", "train", "coin", "coin-7"))
