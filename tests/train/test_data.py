"""Examples and masks on real TWX expert trajectories, decoded back to text, for three chat templates."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest

from exprag.bank import Filters, Retriever, build_bank
from exprag.bank.store import dynamic_key
from exprag.envs import action_templates
from exprag.errors import DataFormatError
from exprag.memory_block import MemorySpec, render_memory
from exprag.prompt import system_prompt
from exprag.train.data import (
    IGNORE,
    TemplateError,
    build_examples,
    example_messages,
    length_batches,
    load_trajectories,
    split_micro,
    tokenize_with_mask,
    trained_spans,
)
from exprag.trajectory import write_jsonl

from tests.train.conftest import EOT


def decoded_runs(tok, ex) -> list[str]:
    return [tok.decode(ex.input_ids[a:b]) for a, b in trained_spans(ex.labels)]


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral"])
def test_masks_decode_to_exactly_the_actions(template, tokenizers, train_trajs, bank):
    tok = tokenizers[template]
    examples, report = build_examples(train_trajs, tok, bank=bank)
    assert report.examples == len(train_trajs) and not report.dropped_overlong
    for t, ex in zip(train_trajs, examples):
        runs = decoded_runs(tok, ex)
        # One trained run per action: the action, then the end-of-turn token; nothing else
        # (the system prompt, memory block and observations are all -100).
        assert len(runs) == len(t.actions())
        for run, action in zip(runs, t.actions()):
            # Mistral glues the template's space to the action's first token: that token is trained.
            assert run.lstrip(" ") == action + EOT[template], (run, action)
        assert ex.trained_tokens == sum(b - a for a, b in trained_spans(ex.labels))
        assert ex.labels[0] == IGNORE


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral"])
def test_masks_without_eot(template, tokenizers, short_trajs):
    tok = tokenizers[template]
    examples, _ = build_examples(short_trajs, tok, train_eot=False)
    for t, ex in zip(short_trajs, examples):
        assert [r.strip() for r in decoded_runs(tok, ex)] == t.actions()


def test_the_trained_text_is_what_the_agent_sees(chatml_tok, short_trajs):
    """Plain LoRA: our system prompt with an empty memory block, rendered by the model's template."""
    t = short_trajs[0]
    (ex,), _ = build_examples([t], chatml_tok)
    msgs = example_messages(t, [], action_templates("twx"))
    assert msgs[0] == {"role": "system", "content": system_prompt(action_templates("twx"), "")}
    assert msgs[-1]["role"] == "assistant"  # the trailing observation carries no loss: dropped
    text = chatml_tok.apply_chat_template(msgs, tokenize=False)
    assert chatml_tok.decode(ex.input_ids) == text
    assert ex.memory_ids == ()


def test_exprag_examples_carry_the_memory_block(chatml_tok, train_trajs, bank):
    examples, _ = build_examples(train_trajs, chatml_tok, bank=bank)
    by_id = {t.id: t for t in bank.trajectories}
    for t, ex in zip(train_trajs, examples):
        assert len(ex.memory_ids) == 2  # K=2, static
        block = render_memory([by_id[i] for i in ex.memory_ids], "json")
        system = system_prompt(action_templates("twx"), block)
        text = chatml_tok.decode(ex.input_ids)
        assert text.startswith("<|im_start|>system\n" + system + "<|im_end|>")
        # Static retrieval, the same call the agent makes at inference (with the leakage filter).
        hits = Retriever(bank).retrieve(t.task, k=2, mode="static", filters=_leak_filter(t))
        assert ex.memory_ids == tuple(h.trajectory.id for h in hits)


def _leak_filter(t):
    from exprag.train.data import leakage_filter

    return leakage_filter(t)


def test_never_retrieves_itself_or_its_task_id(chatml_tok, train_trajs, tmp_path):
    # Copies of each trajectory under another id but the same task_id (a second rollout of the
    # same game): the best possible matches, which must never be retrieved.
    copies = [replace(t, id=t.id + ":again", source="again") for t in train_trajs]
    bank = build_bank(train_trajs + copies, tmp_path / "bank", "bm25")
    # Teeth: unfiltered, a trajectory's own dynamic key as the query scores itself best (tied at most
    # with keys of identical text: task + actions repeat across a TWX game's seeds).
    row = {t.id: i for i, t in enumerate(bank.trajectories)}
    for t in train_trajs:
        s = bank.index("dynamic").scores([dynamic_key(t)])[0]
        assert s[row[t.id]] >= s.max() - 1e-5 and s[row[t.id + ":again"]] >= s.max() - 1e-5
    task_of = {t.id: t.task_id for t in bank.trajectories}
    static, _ = build_examples(train_trajs, chatml_tok, bank=bank)
    dynamic, _ = build_examples(train_trajs[::4], chatml_tok, bank=bank, serialization="step",
                                memory=MemorySpec(k=2, mode="dynamic"))
    for ex in static + dynamic:
        t_id = ex.trajectory_id
        assert len(ex.memory_ids) == 2
        assert t_id not in ex.memory_ids and t_id + ":again" not in ex.memory_ids
        assert all(task_of[m] != task_of[t_id] for m in ex.memory_ids)


def test_empty_memory_fraction(chatml_tok, train_trajs, bank):
    examples, report = build_examples(train_trajs, chatml_tok, bank=bank, empty_memory_fraction=0.5, seed=7)
    empty = [ex for ex in examples if not ex.memory_ids]
    assert len(empty) == report.empty_memory == round(0.5 * len(train_trajs))
    plain = system_prompt(action_templates("twx"), "")
    for ex in empty:
        assert chatml_tok.decode(ex.input_ids).startswith("<|im_start|>system\n" + plain + "<|im_end|>")
    again, _ = build_examples(train_trajs, chatml_tok, bank=bank, empty_memory_fraction=0.5, seed=7)
    assert [e.memory_ids for e in again] == [e.memory_ids for e in examples]  # deterministic in the seed


def test_overlong_trims_memory_then_whole_turns(chatml_tok, train_trajs, bank):
    full, _ = build_examples(train_trajs, chatml_tok, bank=bank)
    plain, _ = build_examples(train_trajs, chatml_tok)
    limit = sorted(len(e) for e in plain)[len(plain) // 2]  # half the examples exceed it even without memory
    examples, report = build_examples(train_trajs, chatml_tok, bank=bank, max_length=limit)
    assert report.trimmed_memory and report.truncated
    assert all(len(e) <= limit for e in examples)
    by_id = {t.id: t for t in train_trajs}
    for ex, f in zip(examples, full):
        actions = by_id[ex.id].actions()
        runs = [r[: -len("<|im_end|>")] for r in decoded_runs(chatml_tok, ex)]
        assert runs == actions[: len(runs)]  # a prefix of whole actions, none cut
        assert all(r.endswith("<|im_end|>") for r in decoded_runs(chatml_tok, ex))
        if len(f) > limit:
            assert len(ex.memory_ids) < 2
    trimmed = {r["id"] for r in report.trimmed_memory}
    assert all(r["kept"] < r["retrieved"] for r in report.trimmed_memory)
    assert {r["id"] for r in report.truncated} <= trimmed | {e.id for e in plain}


def test_overlong_drop(chatml_tok, train_trajs):
    plain, _ = build_examples(train_trajs, chatml_tok)
    limit = sorted(len(e) for e in plain)[len(plain) // 2]
    examples, report = build_examples(train_trajs, chatml_tok, max_length=limit, overlong="drop")
    assert len(examples) + len(report.dropped_overlong) == len(train_trajs)
    assert {d["id"] for d in report.dropped_overlong} == {e.id for e in plain if len(e) > limit}


def test_one_example_per_step(chatml_tok, short_trajs, bank):
    t = short_trajs[0]
    steps, _ = build_examples([t], chatml_tok, bank=bank, serialization="step")
    (whole,), _ = build_examples([t], chatml_tok, bank=bank)
    assert len(steps) == len(t.actions())
    for k, ex in enumerate(steps):
        assert decoded_runs(chatml_tok, ex) == [t.actions()[k] + "<|im_end|>"]
        assert ex.memory_ids == whole.memory_ids  # static: one retrieval per episode
        assert whole.input_ids[: len(ex)] == ex.input_ids  # each step's context is a prefix
    assert steps[-1].input_ids == whole.input_ids


def test_dynamic_retrieval_per_step(chatml_tok, short_trajs, bank):
    t = short_trajs[0]
    steps, _ = build_examples([t], chatml_tok, bank=bank, serialization="step",
                              memory=MemorySpec(k=2, mode="dynamic"))
    assert len(steps) == len(t.actions()) and all(len(e.memory_ids) == 2 for e in steps)
    with pytest.raises(ValueError, match="serialization='step'"):
        build_examples([t], chatml_tok, bank=bank, memory=MemorySpec(mode="dynamic"))


def test_a_template_that_rewrites_actions_is_refused(rewriting_tok, short_trajs):
    with pytest.raises(TemplateError, match="rewrites"):
        build_examples(short_trajs[:1], rewriting_tok)  # upper-cases every turn
    t = short_trajs[0]
    sneaky = copy.deepcopy(rewriting_tok)  # rewrites real actions, leaves the sentinels alone
    sneaky.chat_template = rewriting_tok.chat_template.replace("(m['content'] | upper)",
                                                               "(m['content'] | replace(' ', '  '))")
    with pytest.raises(TemplateError, match="rewrites assistant turns"):
        build_examples([t], sneaky)


def test_trajectory_without_action_names_file_and_line(short_trajs, tmp_path):
    bad = replace(short_trajs[1], messages=short_trajs[1].messages[:1], num_steps=0)
    f = tmp_path / "t.jsonl"
    write_jsonl(f, [short_trajs[0], bad])
    with pytest.raises(DataFormatError, match=r"t\.jsonl:2: field 'messages' has no assistant turn"):
        load_trajectories([f])


def test_unsuccessful_trajectories_are_skipped_and_counted(short_trajs, tmp_path):
    f = tmp_path / "t.jsonl"
    write_jsonl(f, [short_trajs[0], replace(short_trajs[1], success=False)])
    trajs, report = load_trajectories([f])
    assert [t.id for t in trajs] == [short_trajs[0].id]
    assert report.skipped_unsuccessful == [short_trajs[1].id]
    assert len(load_trajectories([f], only_successful=False)[0]) == 2


def test_length_batches_cover_everything_and_cut_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(50, 3000) for _ in range(500)]
    batches = length_batches(lengths, batch_size=8, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert batches == length_batches(lengths, batch_size=8, seed=1, epoch=0)
    assert batches != length_batches(lengths, batch_size=8, seed=1, epoch=1)

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    unbucketed = length_batches(lengths, batch_size=8, seed=1, epoch=0, bucket=False)
    assert padded(batches) < 0.6 * padded(unbucketed)
    capped = length_batches(lengths, batch_size=8, max_batch_tokens=6000, seed=1)
    assert all(len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 6000 for b in capped)
    micro = split_micro(batches[0], lengths, 3, None)
    assert sorted(i for m in micro for i in m) == sorted(batches[0]) and all(len(m) <= 3 for m in micro)


def test_tokenize_with_mask_on_a_handmade_chat(tokenizers):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "look"},
            {"role": "assistant", "content": "go north"}, {"role": "user", "content": "You see a door."},
            {"role": "assistant", "content": "open door"}]
    for name, tok in tokenizers.items():
        ids, labels = tokenize_with_mask(tok, msgs, train=lambda k: k == 1)
        runs = [tok.decode(ids[a:b]).lstrip(" ") for a, b in trained_spans(labels)]
        assert runs == ["open door" + EOT[name]], name


def test_report_is_json_serialisable(chatml_tok, train_trajs, bank):
    _, report = build_examples(train_trajs, chatml_tok, bank=bank, max_length=1500)
    json.dumps(report.summary())
    json.dumps(report.trimmed_memory + report.truncated + report.dropped_overlong)


# ---- leakage across trials: official ALFWorld layout ------------------------------------------------
# json_2.1.1/train/<task folder>/<trial>/game.tw-pddl: the trials of one folder share the scene (the
# folder name's trailing number), the goal and the task text.
_ALF_FOLDERS = {
    "pick_and_place_simple-Book-None-Desk-313": ("put a book in desk.", "desk", 3),
    "look_at_obj_in_light-Book-None-DeskLamp-313": ("examine the book with the desklamp.", "desklamp", 2),
    "pick_and_place_simple-Book-None-Desk-301": ("put a book in desk.", "desk", 2),
    "pick_clean_then_place_in_recep-Mug-None-CoffeeMachine-5": ("clean some mug and put it in coffeemachine.",
                                                              "coffeemachine", 3),
    "pick_cool_then_place_in_recep-Mug-None-CoffeeMachine-5": ("cool some mug and put it in coffeemachine.",
                                                             "coffeemachine", 2),
    "pick_heat_then_place_in_recep-Egg-None-Fridge-12": ("heat some egg and put it in fridge.", "fridge", 2),
}
_ROOMS = {"313": ("a bed 1, a desk 1, a desklamp 1, a drawer 1, a shelf 1", "shelf"),
          "301": ("a bed 1, a desk 1, a dresser 1, a garbagecan 1", "dresser"),
          "5": ("a cabinet 1, a coffeemachine 1, a fridge 1, a sinkbasin 1", "cabinet"),
          "12": ("a countertop 1, a fridge 1, a microwave 1", "countertop")}


def official_alfworld_trajs():
    from exprag.trajectory import Trajectory

    out = []
    for folder, (task, target, trials) in _ALF_FOLDERS.items():
        ttype, obj, _, _, scene = folder.split("-")
        for n in range(trials):
            room, holder = _ROOMS[scene]
            where = f"{holder} {n + 1}"  # trials of a folder differ in where the object starts
            actions = [f"go to {where}", f"take {obj.lower()} 1 from {where}", f"go to {target} 1",
                       f"move {obj.lower()} 1 to {target} 1"]
            msgs = [{"role": "user", "content": "-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of "
                                                f"a room. Looking quickly around you, you see {room}.\n\n"
                                                f"Your task is to: {task}"}]
            for a in actions:
                msgs += [{"role": "assistant", "content": a}, {"role": "user", "content": f"You {a}."}]
            tid = f"{folder}/trial_T2019090{n}_0109{n}3_36671{n}"
            out.append(Trajectory(id=f"alfworld:train:{tid}:expert", env="alfworld", env_version="alfworld==0.4",
                                  split="train", task_type=ttype, task_id=tid, task=task, messages=msgs,
                                  success=True, reward=1.0, num_steps=len(actions), source="expert"))
    return out


def test_no_training_memory_from_the_same_alfworld_task_folder(chatml_tok, tmp_path):
    trajs = official_alfworld_trajs()
    bank = build_bank(trajs, tmp_path / "bank", "bm25")
    folder = {t.id: t.task_id.split("/")[0] for t in trajs}
    scene = {t.id: folder[t.id].rsplit("-", 1)[1] for t in trajs}
    # Teeth: excluding only the trajectory itself and its own trial, the closest memory (the whole
    # episode as a dynamic query) is a twin trial of the same folder (same text, same scene).
    r = Retriever(bank)
    for t in trajs:
        own_trial = Filters(exclude_ids={t.id}, exclude_task_ids={t.task_id})
        top = r.retrieve(t.task, t.episode_messages(), k=1, mode="dynamic", filters=own_trial)[0]
        assert folder[top.trajectory.id] == folder[t.id]

    examples, _ = build_examples(trajs, chatml_tok, bank=bank)
    for ex in examples:
        assert len(ex.memory_ids) == 2
        assert all(folder[m] != folder[ex.trajectory_id] for m in ex.memory_ids)
    # The same-goal folder of another scene (Desk-301) is still a fair memory for Desk-313.
    desk313 = [ex for ex in examples if folder[ex.trajectory_id].endswith("Desk-313")]
    assert all(folder[ex.memory_ids[0]] == "pick_and_place_simple-Book-None-Desk-301" for ex in desk313)

    by_scene, _ = build_examples(trajs, chatml_tok, bank=bank, leakage="scene")
    for ex in by_scene:
        assert len(ex.memory_ids) == 2
        assert all(scene[m] != scene[ex.trajectory_id] for m in ex.memory_ids)
    # scene 313's only other folder (the desklamp one) was a memory under the folder rule
    assert any(scene[m] == scene[ex.trajectory_id] for ex in examples for m in ex.memory_ids)


def test_leakage_groups_per_env():
    from exprag.envs import leakage_group

    official = "pick_and_place_simple-Book-None-Desk-313/trial_T20190908_124340_674467"
    generated = "look_at_obj_in_light-Book-None-DeskLamp-313/trial_gen_s0_00007"
    assert leakage_group("alfworld", official) == "pick_and_place_simple-Book-None-Desk-313"
    assert leakage_group("alfworld", official, "scene") == leakage_group("alfworld", generated, "scene")
    assert leakage_group("alfworld", official) != leakage_group("alfworld", generated)
    # ScienceWorld: one variation; TWX: one game seed (no finer scene identity in either)
    for env, tid in (("scienceworld", "boil/var12"), ("twx", "coin/seed3")):
        assert leakage_group(env, tid) == leakage_group(env, tid, "scene") == tid
    with pytest.raises(ValueError, match="leakage scope"):
        leakage_group("twx", "coin/seed3", "room")


def test_token_budget_shortens_training_memories(chatml_tok, train_trajs, bank):
    from exprag.memory_block import block_cost, memory_block, token_counter

    count = token_counter(chatml_tok)
    train_trajs = train_trajs[::2]  # one trajectory in two of each game: seconds
    whole, _ = build_examples(train_trajs, chatml_tok, bank=bank)
    by_id = {t.id: t for t in bank.trajectories}
    sizes = [count(render_memory([by_id[i] for i in ex.memory_ids])) for ex in whole]
    budget = sorted(sizes)[len(sizes) // 2]  # half the examples' memories exceed it
    cut, report = build_examples(train_trajs, chatml_tok, bank=bank, memory=MemorySpec(token_budget=budget))
    assert [ex.memory_ids for ex in cut] == [ex.memory_ids for ex in whole]  # shortened, never swapped
    hits = Retriever(bank).retrieve_batch([(t.task, None) for t in train_trajs], k=2,
                                          filters=[_leak_filter(t) for t in train_trajs],
                                          token_budget=budget, cost=block_cost("json", count))
    shortened = 0
    for ex, h, size in zip(cut, hits, sizes):
        block = memory_block(h)
        assert count(block) <= budget
        assert chatml_tok.decode(ex.input_ids).startswith(
            "<|im_start|>system\n" + system_prompt(action_templates("twx"), block) + "<|im_end|>")
        shortened += size > budget
        assert ("more step" in block) == (size > budget)
    assert shortened >= len(cut) // 3 and report.summary()["shortened_memory"] == shortened
