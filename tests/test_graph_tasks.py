"""ProsQA and ProntoQA: labels against BFS on the records, CSFT targets against brute-force walks, the importer
on Coconut's file and on broken records, bad settings, and `cot2 generate` end to end."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tasks import TaskConfigError, TaskData, get_task
from tasks.base import ARROW, BOS
from tasks.graph import QUESTION, GraphInstance
from tasks.prontoqa import ProntoQA, ProntoQAConfig
from tasks.prosqa import ProsQA, ProsQAConfig

COCONUT_VALID = Path(__file__).resolve().parents[2] / "shared/data/prosqa_valid.json"
needs_coconut = pytest.mark.skipif(not COCONUT_VALID.exists(), reason=f"{COCONUT_VALID} is absent")
COT2 = Path(sys.executable).with_name("cot2")


def prosqa(**overrides) -> ProsQA:
    return ProsQA(ProsQAConfig(**{"n_train": 200, "n_valid": 20, "n_test": 20, **overrides}))


def prontoqa(**overrides) -> ProntoQA:
    return ProntoQA(ProntoQAConfig(**{"n_train": 200, "n_valid": 21, "n_test": 20, **overrides}))


def bfs(edges: list, source: int) -> dict[int, int]:
    succ = defaultdict(list)
    for u, v in edges:
        succ[u].append(v)
    dist, frontier = {source: 0}, [source]
    for node in frontier:
        for nxt in succ[node]:
            if nxt not in dist:
                dist[nxt] = dist[node] + 1
                frontier.append(nxt)
    return dist


def brute_targets(edges: list, root: int, goal: int, n_steps: int, budget: int | None) -> list[dict[int, float]]:
    """Every S-step walk (sinks and the goal stay put), the first `budget` in the task's order, and per step
    the distinct t-step prefixes ending at each node, normalised."""
    succ = defaultdict(set)
    for u, v in edges:
        succ[u].add(v)
    walks = [(root,)]
    for _ in range(n_steps):
        walks = [w + (y,) for w in walks for y in ([w[-1]] if w[-1] == goal or not succ[w[-1]] else succ[w[-1]])]
    ordered = sorted(walks, key=lambda w: (0, w.index(goal), w) if goal in w else (1, 0, w))
    chosen = ordered if budget is None else ordered[:budget]
    out = []
    for t in range(1, n_steps + 1):
        prefixes = {w[: t + 1] for w in chosen}
        counts = defaultdict(float)
        for p in prefixes:
            counts[p[-1]] += 1.0 / len(prefixes)
        out.append(dict(counts))
    return out


def decode_prompt(task, row: torch.Tensor) -> tuple[list, list]:
    """Edges and question (node ids) back from a prompt row, checking its layout on the way."""
    tokens = [task.vocab[i] for i in row.tolist() if i != 0]
    assert tokens[0] == BOS and tokens[-2] == ARROW
    body, asked = tokens[1 : tokens.index(QUESTION)], tokens[tokens.index(QUESTION) + 1 : -2]
    assert len(body) % 2 == 0 and all(t.startswith("N") for t in body)
    edges = [[int(u[1:]), int(v[1:])] for u, v in zip(body[0::2], body[1::2], strict=True)]
    return edges, [int(q[1:]) for q in (tokens[-1], *asked)]


def check_trace(record: dict, n_steps: int, goal: int) -> None:
    """The trace walks edges from the root, reaches the goal by the shortest path, then stays there."""
    edges = {tuple(e) for e in record["edges"]}
    walk = [record["root"], *record["trace"]]
    assert len(record["trace"]) == n_steps
    hops = bfs(record["edges"], record["root"])[goal]
    assert walk[hops] == goal and set(walk[hops:]) == {goal}
    assert all((u, v) in edges for u, v in zip(walk[:hops], walk[1 : hops + 1], strict=True))


# -- generated instances, checked from their records -----------------------------------------------


def test_prosqa_instances_are_labelled_as_bfs_finds_them():
    task = prosqa()
    data = task.build()
    assert len(data.records) == 240 and data.indices("valid").numel() == 20
    for i, rec in enumerate(data.records):
        dist = bfs(rec["edges"], rec["root"])
        assert rec["target"] in dist and rec["neg_target"] not in dist
        assert dist[rec["target"]] == rec["hops"] and 3 <= rec["hops"] <= 6
        assert rec["question"][0] == rec["root"]
        assert sorted(rec["question"][1:]) == sorted([rec["target"], rec["neg_target"]])
        assert rec["answer"] == rec["target"] and int(data.answer[i]) == task.node_offset + rec["target"]
        check_trace(rec, task.n_steps, rec["target"])
        assert data.trace[i].tolist() == [task.node_offset + v for v in rec["trace"]]
        edges, question = decode_prompt(task, data.prompt[i])
        assert edges == [list(e) for e in rec["edges"]] and question == rec["question"]
        assert all(0 <= v < task.n_node_tokens for e in edges for v in e)
    first = [rec["question"][1] == rec["target"] for rec in data.records]
    assert 0.35 < sum(first) / len(first) < 0.65


def test_prontoqa_instances_are_labelled_as_bfs_finds_them():
    task = prontoqa()
    data = task.build()
    for split in ("train", "valid", "test"):
        answers = [data.records[i]["answer"] for i in data.indices(split).tolist()]
        assert abs(answers.count("True") - answers.count("False")) <= 1
    for i, rec in enumerate(data.records):
        dist = bfs(rec["edges"], rec["root"])
        assert max(dist.values()) <= task.n_steps  # whatever the root reaches, it reaches within n_hops
        reachable = rec["query"] in dist and dist[rec["query"]] <= task.n_steps
        assert reachable == (rec["answer"] == "True")
        assert rec["hops"] == (dist[rec["query"]] if reachable else None)
        assert task.vocab[int(data.answer[i])] == rec["answer"]
        chain_end = int(data.extra["goal"][i])
        assert dist[chain_end] == task.n_steps and (rec["answer"] == "False" or chain_end == rec["query"])
        check_trace(rec, task.n_steps, chain_end)
        edges, question = decode_prompt(task, data.prompt[i])
        assert edges == [list(e) for e in rec["edges"]] and question == [rec["root"], rec["query"]]


@pytest.mark.parametrize("make", [prosqa, prontoqa])
def test_sink_loops_list_each_sink_once_and_change_nothing_else(make):
    plain, looped = make().build(), make(sink_loops=True).build()
    assert looped.records == plain.records and torch.equal(looped.trace, plain.trace)
    assert all(torch.equal(looped.extra[k], plain.extra[k]) for k in plain.extra)
    task = make(sink_loops=True)
    for i, rec in enumerate(looped.records):
        edges, question = decode_prompt(task, looped.prompt[i])
        sources = {u for u, _ in rec["edges"]}
        sinks = {x for e in rec["edges"] for x in e} - sources
        assert sorted(map(tuple, edges)) == sorted([*map(tuple, rec["edges"]), *((s, s) for s in sinks)])
        assert question == decode_prompt(make(), plain.prompt[i])[1]


def test_generation_is_seeded():
    a, b, c = (prosqa(n_train=50, seed=seed).build() for seed in (0, 0, 1))
    assert torch.equal(a.prompt, b.prompt) and a.records == b.records
    assert not torch.equal(a.prompt[:, -4:], c.prompt[:, -4:])


# -- CSFT step targets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: prosqa(n_train=40, n_valid=0, n_test=0),
        lambda: prontoqa(n_train=30, max_branches=2, branch_prob=0.5),  # varied branching: walks up to 11
    ],
)
def test_step_targets_match_brute_force_walks(make):
    task = make()
    data = task.build()
    top = task.max_budget(data)
    walk_totals = []
    for budget in (1, 2, 3, 7, None):
        targets = task.step_targets(data, budget)
        assert targets.shape == (len(data.records), task.n_steps, data.vocab_size)
        assert torch.allclose(targets.sum(-1), torch.ones(targets.shape[:2]))
        assert targets[..., : task.node_offset].abs().sum() == 0
        for i, rec in enumerate(data.records):
            goal = int(data.extra["goal"][i])
            expected = brute_targets(rec["edges"], rec["root"], goal, task.n_steps, budget)
            got = torch.zeros(task.n_steps, data.vocab_size)
            for t, dist in enumerate(expected):
                for node, p in dist.items():
                    got[t, task.node_offset + node] = p
            assert torch.allclose(targets[i], got, atol=1e-6), (budget, rec)
            if budget is None:
                walk_totals.append(len(brute_targets(rec["edges"], rec["root"], goal, task.n_steps, None)[-1]))
    one_hot = torch.nn.functional.one_hot(data.trace, data.vocab_size).float()
    assert torch.equal(task.step_targets(data, 1), one_hot)
    assert torch.equal(task.step_targets(data, top), task.step_targets(data, None))
    with pytest.raises(TaskConfigError, match=f"budget B={top + 1} is out of range: allowed 1..{top}"):
        task.step_targets(data, top + 1)


def test_step_targets_on_a_hand_made_diamond():
    # root -> a -> goal, root -> b -> goal, a -> sink: walks r a s s, r a g g, r b g g
    task = prosqa(n_steps=3, max_hops=3)
    root, a, b, sink, goal, neg = range(6)
    instance = GraphInstance(6, [(root, a), (root, b), (a, goal), (b, goal), (a, sink)], root, [goal, neg], goal)
    encoded = task.encode([instance], seed=0)
    data = TaskData(task.vocab, encoded.prompt, encoded.trace, encoded.trace[:, -1], torch.zeros(1).long(),
                    encoded.extra)
    token = (task.node_offset + encoded.names[0]).tolist()
    full = task.step_targets(data)[0]
    assert task.max_budget(data) == 3
    assert full[0, token[a]] == full[0, token[b]] == 0.5
    assert torch.allclose(full[1:, token[sink]], torch.tensor([1 / 3, 1 / 3]))
    assert torch.allclose(full[1:, token[goal]], torch.tensor([2 / 3, 2 / 3]))
    both_paths = task.step_targets(data, 2)[0]  # the two walks that reach the goal
    assert both_paths[0, token[a]] == both_paths[0, token[b]] == 0.5 and both_paths[1:, token[goal]].tolist() == [1, 1]
    assert encoded.trace[0, 1:].tolist() == [token[goal], token[goal]]


# -- the importer --------------------------------------------------------------------------------------


def write_json(path: Path, content) -> Path:
    path.write_text(json.dumps(content))
    return path


@needs_coconut
def test_importer_accepts_coconut_records(tmp_path):
    originals = json.loads(COCONUT_VALID.read_text())[:20]
    task = prosqa(source=str(write_json(tmp_path / "first20.json", originals)))
    data = task.build()
    assert task.statistics(data)["skipped"] == "none"
    assert data.indices("valid").numel() == 20 and len(data.records) == 20
    for i, (rec, original) in enumerate(zip(data.records, originals, strict=True)):
        symbols = original["idx_to_symbol"]
        assert rec["source_index"] == i
        assert rec["symbols"][rec["answer"]] == symbols[original["target"]] == original["answer"].split(" a ")[-1][:-1]
        assert int(data.answer[i]) == task.node_offset + rec["target"]
        assert rec["symbols"][rec["neg_target"]] == symbols[original["neg_target"]]
        assert rec["symbols"][rec["root"]] == symbols[original["root"]]
        asked = [rec["symbols"][q] for q in rec["question"][1:]]
        assert original["question"].endswith(f"Is {symbols[original['root']]} a {asked[0]} or {asked[1]}?")
        assert rec["hops"] == len(original["steps"])
        check_trace(rec, task.n_steps, rec["target"])
        assert len(rec["edges"]) == len(original["edges"])


@needs_coconut
def test_importer_statistics_are_coconuts():
    task = prosqa(source=str(COCONUT_VALID))
    stats = task.statistics(task.build())
    assert stats["nodes"] == {"mean": 22.82, "max": 28} and stats["edges"] == {"mean": 36.26, "max": 53}
    assert stats["hops"] == {"3": 124, "4": 133, "5": 36, "6": 7}
    assert stats["target_asked_first"] == "144/300 (0.48)"


@needs_coconut
def test_generated_statistics_are_within_ten_percent_of_coconuts():
    coconut = prosqa(source=str(COCONUT_VALID))
    generated = prosqa(n_train=1000)
    real, ours = coconut.statistics(coconut.build()), generated.statistics(generated.build())

    def mean_hops(histogram: dict) -> float:
        return sum(int(h) * c for h, c in histogram.items()) / sum(histogram.values())

    for figure in ("nodes", "edges"):
        assert abs(ours[figure]["mean"] / real[figure]["mean"] - 1) < 0.1, figure
    assert abs(mean_hops(ours["hops"]) / mean_hops(real["hops"]) - 1) < 0.1
    assert set(ours["hops"]) == set(real["hops"])


@needs_coconut
def test_importer_reports_broken_records(tmp_path):
    good = json.loads(COCONUT_VALID.read_text())[0]  # root 1 (Tom), target 16, neg_target 13, 18 nodes
    out_of_range = copy.deepcopy(good)
    out_of_range["edges"].append([0, 99])
    unreachable = copy.deepcopy(good)
    unreachable["edges"] = [e for e in good["edges"] if e[1] != good["target"]]
    reachable_neg = copy.deepcopy(good)
    reachable_neg["edges"].append([good["root"], good["neg_target"]])
    missing = copy.deepcopy(good)
    del missing["edges"]
    wrong_question = copy.deepcopy(good)
    wrong_question["question"] = good["question"].rsplit("Is ", 1)[0] + "Is Tom a lempus or yimpus?"
    wrong_answer = dict(good, answer="Tom is a scrompus.")
    records = [good, out_of_range, unreachable, reachable_neg, missing, wrong_question, "not a record", wrong_answer]
    task = prosqa(source=str(write_json(tmp_path / "broken.json", records)))
    data = task.build()
    assert len(data.records) == 1 and data.records[0]["source_index"] == 0
    assert task.statistics(data)["skipped"] == {
        "1": "edge 23 [0, 99] is not a pair of node indices 0..17",
        "2": "target 16 is not reachable from root 1",
        "3": "neg_target 13 is reachable from root 1",
        "4": "missing field edges",
        "5": "question asks 'Is Tom a lempus or yimpus?', not about root 'Tom', target and neg_target",
        "6": "record is a str, not an object",
        "7": "answer 'Tom is a scrompus.' does not name target 'lempus'",
    }
    nothing_usable = write_json(tmp_path / "nothing.json", records[1:])
    with pytest.raises(TaskConfigError, match=r"nothing.json has no usable record among 7 \(record 0: edge 23"):
        prosqa(source=str(nothing_usable)).build()


def test_importer_rejects_files_it_cannot_read(tmp_path):
    with pytest.raises(TaskConfigError, match="task.source=.*absent.json does not exist"):
        prosqa(source=str(tmp_path / "absent.json"))
    with pytest.raises(TaskConfigError, match="object.json holds a dict, not a list of records"):
        prosqa(source=str(write_json(tmp_path / "object.json", {"edges": []}))).build()
    (tmp_path / "text.json").write_text("Every wumpus is a yumpus.")
    with pytest.raises(TaskConfigError, match="text.json is not a readable JSON file"):
        prosqa(source=str(tmp_path / "text.json")).build()


def test_fingerprint_follows_the_source_content(tmp_path):
    source = tmp_path / "records.json"
    write_json(source, [])
    before = prosqa(source=str(source)).fingerprint()
    write_json(source, [{}])
    after = prosqa(source=str(source)).fingerprint()
    assert before["source_sha256"] != after["source_sha256"]
    assert "source_sha256" not in prosqa().fingerprint()


# -- settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: prosqa(min_nodes=0), "task.min_nodes=0 is out of range: allowed 1..28"),
        (lambda: prosqa(max_nodes=0), "task.max_nodes=0 is out of range: allowed >= 4"),
        (lambda: prosqa(min_hops=30), "task.max_hops=6 is below task.min_hops=30"),
        (lambda: prosqa(min_hops=26, max_hops=26, n_steps=26), "task.min_hops=26 needs graphs of at least 29 nodes"),
        (lambda: prosqa(max_hops=7), "task.max_hops=7 is more than task.n_steps=6"),
        (lambda: prosqa(n_train=-1), "task.n_train=-1 is out of range: allowed >= 0"),
        (lambda: prosqa(n_train=0, n_valid=0, n_test=0), "task.n_train, n_valid and n_test are all 0"),
        (lambda: prosqa(mixed_parent_prob=1.5), "task.mixed_parent_prob=1.5 is out of range: allowed 0..1"),
        (lambda: prosqa(in_degree_rate=0.0), "task.in_degree_rate=0.0 must be > 0"),
        (lambda: prosqa(source_split="dev"), "task.source_split='dev' is not a split: allowed train, valid, test"),
        (lambda: prontoqa(n_hops=0), "task.n_hops=0 is out of range: allowed >= 1"),
        (lambda: prontoqa(branch_prob=2.0), "task.branch_prob=2.0 is out of range: allowed 0..1"),
        (lambda: prontoqa(max_branch_length=0), "task.max_branch_length=0 is out of range: allowed >= 1"),
    ],
)
def test_bad_settings_name_the_value(make, message):
    with pytest.raises(TaskConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_infeasible_generator_settings_fail_in_one_line():
    with pytest.raises(TaskConfigError, match="no graph with a target 6..6 hops .* task.max_nodes=9"):
        prosqa(min_nodes=9, max_nodes=9, min_hops=6, max_hops=6).build()


def test_registry_builds_both_tasks_from_their_configs():
    assert get_task("prosqa") is ProsQA and get_task("prontoqa") is ProntoQA


# -- the CLI -------------------------------------------------------------------------------------------


def cot2_generate(*overrides: str, outputs: Path) -> subprocess.CompletedProcess:
    args = [str(COT2), "generate", *overrides, f"paths.outputs={outputs}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_cli_generates_prosqa(tmp_path):
    proc = cot2_generate("task=prosqa", "task.n_train=50", "task.n_valid=10", "task.n_test=10", outputs=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (folder,) = (tmp_path / "data").glob("prosqa-*")
    assert torch.load(folder / "data.pt", weights_only=True)["prompt"].shape[0] == 70
    assert len((folder / "instances.jsonl").read_text().splitlines()) == 70
    assert "target asked first" in proc.stdout and "hops" in proc.stdout

    bad = cot2_generate("task=prosqa", "task.min_nodes=0", outputs=tmp_path / "bad")
    assert bad.returncode == 2 and "task.min_nodes=0" in bad.stderr
    assert not (tmp_path / "bad" / "data").exists() or not any((tmp_path / "bad" / "data").glob("prosqa-*"))


@needs_coconut
def test_cli_imports_coconut_valid(tmp_path):
    proc = cot2_generate("task=prosqa", f"task.source={COCONUT_VALID}", outputs=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (folder,) = (tmp_path / "data").glob("prosqa-*")
    saved = torch.load(folder / "data.pt", weights_only=True)
    assert saved["split"].tolist() == [1] * 300
    assert len((folder / "instances.jsonl").read_text().splitlines()) == 300
    assert "300 of 300" in proc.stdout and "skipped" in proc.stdout


def test_eval_scores_a_run_on_the_imported_coconut_split(tmp_path):
    """`cot2 eval eval.source=<Coconut file>` scores a ProsQA run on the imported records, padded to its width."""
    if not COCONUT_VALID.exists():
        pytest.skip("Coconut's ProsQA validation split is not beside the repo")
    env = {**os.environ, "COT2_OUTPUTS": str(tmp_path / "outputs")}
    cot2 = str(Path(sys.executable).with_name("cot2"))
    subprocess.run([cot2, "train", "task=prosqa", "task.n_train=40", "task.n_valid=10", "task.n_test=10",
                    "model=gpt2_1l1h", "model.d_model=16", "optim.epochs=1", "run.name=tiny"],
                   env=env, check=True, capture_output=True)
    proc = subprocess.run([cot2, "eval", "run=tiny", f"eval.source={COCONUT_VALID}", "eval.pass_k=[]",
                           "eval.temperatures=[]", "eval.mts_K=[]"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "300 instances" in proc.stdout
    rows = (tmp_path / "outputs/runs/prosqa/train-cot2/tiny/eval.csv").read_text()
    assert "valid:prosqa_valid.json" in rows
