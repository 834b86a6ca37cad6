"""ProsQA (Coconut): is the root entity a `target` or a `neg_target`? Exactly one is reachable from the root.

Generator (Coconut's sketch; their code was never released): nodes 0 and 1 are entities. Each later concept
draws its parents (edge parent -> concept, "every parent is a concept") from the concepts reachable from
entity 0 only, from entity 1 only, or from anywhere (`mixed_parent_prob`); how many follows a
Poisson(`in_degree_rate`) redrawn until positive, and parents are picked with weight 1 + depth_weight * depth
so chains grow long. A few extra entities point at random concepts. Of the two entities, the one whose own
childless concepts lie deeper (shortest path) becomes the root: in Coconut's data the deepest childless
concept reachable only from the root is always the target, and the neg_target's entity never reaches a
childless concept of its own deeper than that. So the target is the root's deepest one (kept if within
min_hops..max_hops, else the graph is redrawn), the neg_target any childless concept reachable only from
the other entity, and the question names them in random order.

Importer: `task.source=<Coconut JSON>` reads records with question, answer, steps, idx_to_symbol, edges,
root, target, neg_target; records that do not hold together are skipped and reported with their reason.

Sequence (S = n_steps): prompt `<BOS> u v ... u v ? root first second ->`, then the root -> target
walk (the target repeated once reached), then the target's node token as the answer.

Coconut's valid set (../shared/data/prosqa_valid.json, 300 instances), measured by `graph_statistics`
through the importer: nodes 22.82 mean / 28 max, edges 36.26 mean / 53 max, shortest root -> target hops
3:124 4:133 5:36 6:7 (41/44/12/2%), target asked first 144/300 (0.48), 6-step walks from the root 23.0 / 153.
The generator at its defaults (18,686 instances, seed 0): nodes 22.55 / 28, edges 36.66 / 60, hops
3:8176 4:7856 5:2301 6:353 (44/42/12/2%), target asked first 0.51, walks 27.0 / 274.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from tasks.base import SPLITS, TaskConfigError, TaskData
from tasks.graph import GraphInstance, GraphTask, check_probability, check_range, check_sizes, hops_from, split_ids

RECORD_FIELDS = ("question", "answer", "steps", "idx_to_symbol", "edges", "root", "target", "neg_target")
QUESTION_END = re.compile(r"Is (.+?) an? (.+?) or (.+?)\?\s*$")
MAX_TRIES = 1000  # consecutive rejected graphs before the settings are called infeasible


@dataclass
class ProsQAConfig:
    name: str = "prosqa"
    n_train: int = field(default=17_886, metadata={"help": "generated training instances"})
    n_valid: int = field(default=300, metadata={"help": "generated validation instances"})
    n_test: int = field(default=500, metadata={"help": "generated test instances"})
    seed: int = field(default=0, metadata={"help": "seed of the graphs, the question order and the node names"})
    min_nodes: int = field(default=17, metadata={"help": "fewest nodes per generated graph"})
    max_nodes: int = field(
        default=28, metadata={"help": "most nodes per graph; also the node tokens N0..N{max_nodes-1}"}
    )
    in_degree_rate: float = field(default=1.5, metadata={"help": "Poisson rate of a concept's parents (>= 1 kept)"})
    depth_weight: float = field(default=1.5, metadata={"help": "parents are picked with weight 1 + this * depth"})
    mixed_parent_prob: float = field(
        default=0.15, metadata={"help": "chance a concept's parents come from both sides (else one side only)"}
    )
    extra_entity_prob: float = field(default=0.03, metadata={"help": "chance a node is an extra entity"})
    min_hops: int = field(default=3, metadata={"help": "shortest root -> target path, fewest edges"})
    max_hops: int = field(default=6, metadata={"help": "shortest root -> target path, most edges"})
    n_steps: int = field(default=6, metadata={"help": "reasoning steps S (>= max_hops; imports need >= their hops)"})
    sink_loops: bool = field(
        default=False,
        metadata={"help": "the prompt also lists `s s` for each node without successors: staying is then a lookup"},
    )
    source: str | None = field(default=None, metadata={"help": "import this Coconut-format JSON file instead"})
    source_split: str = field(default="valid", metadata={"help": "split of every imported record (train|valid|test)"})


@dataclass
class Imported:
    """What the importer kept (instances with their record fields) and what it skipped, by record index."""

    instances: list[GraphInstance]
    notes: list[dict[str, Any]]
    skipped: dict[str, str]


def positive_poisson_cdf(rate: float) -> list[float]:
    """Cumulative P(k) of Poisson(rate) conditioned on k >= 1, for k = 1, 2, ... up to a negligible tail."""
    term, total, cdf = math.exp(-rate), 0.0, []
    norm = 1.0 - term
    for k in range(1, 1000):
        term *= rate / k
        total += term / norm
        cdf.append(total)
        if total > 1.0 - 1e-12:
            break
    return cdf


class WeightedPool:
    """Nodes with cumulative weights: draws without replacement, each proportional to weight among the rest."""

    def __init__(self) -> None:
        self.items: list[int] = []
        self.cumulative: list[float] = []

    def add(self, item: int, weight: float) -> None:
        self.items.append(item)
        self.cumulative.append((self.cumulative[-1] if self.cumulative else 0.0) + weight)

    def draw(self, rng: random.Random, k: int) -> list[int]:
        if k >= len(self.items):
            return list(self.items)
        chosen: list[int] = []
        while len(chosen) < k:  # a repeat is redrawn, which renormalises over the rest
            item = self.items[bisect.bisect_right(self.cumulative, rng.random() * self.cumulative[-1])]
            if item not in chosen:
                chosen.append(item)
        return chosen


class ProsQA(GraphTask):
    name = "prosqa"
    Config = ProsQAConfig

    def __init__(self, cfg: Any):
        check_range("max_nodes", cfg.max_nodes, 4)
        check_range("n_steps", cfg.n_steps, 1)
        if cfg.source_split not in SPLITS:
            raise TaskConfigError(f"task.source_split={cfg.source_split!r} is not a split: allowed {', '.join(SPLITS)}")
        if cfg.source is None:
            check_sizes(cfg)
            check_range("min_hops", cfg.min_hops, 1)
            if cfg.max_hops < cfg.min_hops:
                raise TaskConfigError(f"task.max_hops={cfg.max_hops} is below task.min_hops={cfg.min_hops}")
            if cfg.max_hops > cfg.n_steps:
                raise TaskConfigError(
                    f"task.max_hops={cfg.max_hops} is more than task.n_steps={cfg.n_steps}: the trace could not reach"
                )
            check_range("min_nodes", cfg.min_nodes, 1, cfg.max_nodes)
            if cfg.min_hops + 3 > cfg.max_nodes:  # root, min_hops path nodes, the other entity, the neg_target
                raise TaskConfigError(
                    f"task.min_hops={cfg.min_hops} needs graphs of at least {cfg.min_hops + 3} nodes, "
                    f"more than task.max_nodes={cfg.max_nodes}"
                )
            if not cfg.in_degree_rate > 0:
                raise TaskConfigError(f"task.in_degree_rate={cfg.in_degree_rate} must be > 0")
            if not cfg.depth_weight >= 0:
                raise TaskConfigError(f"task.depth_weight={cfg.depth_weight} must be >= 0")
            check_probability("mixed_parent_prob", cfg.mixed_parent_prob)
            check_probability("extra_entity_prob", cfg.extra_entity_prob)
        elif not Path(cfg.source).is_file():
            raise TaskConfigError(f"task.source={cfg.source} does not exist or is not a file")
        super().__init__(cfg, int(cfg.max_nodes))

    def fingerprint(self) -> Any:
        base = super().fingerprint()
        if self.cfg.source is None:
            return base
        return {**base, "source_sha256": hashlib.sha256(Path(self.cfg.source).read_bytes()).hexdigest()}

    # -- generator -----------------------------------------------------------------------
    def sample_instance(self, rng: random.Random, in_degree_cdf: list[float]) -> GraphInstance | None:
        """One random graph and question, or None when it has no usable target or neg_target."""
        cfg = self.cfg
        n = cfg.min_nodes + sum(rng.random() < 0.5 for _ in range(cfg.max_nodes - cfg.min_nodes))
        entity = [v < 2 or rng.random() < cfg.extra_entity_prob for v in range(n)]
        label = [1, 2] + [0] * (n - 2)  # bit 1: reachable from the root (node 0), bit 2: from node 1
        depth = [0] * n
        root_side, other_side, anywhere = WeightedPool(), WeightedPool(), WeightedPool()
        for pool, node in ((root_side, 0), (other_side, 1), (anywhere, 0), (anywhere, 1)):
            pool.add(node, 1.0)
        one_side = (1.0 + cfg.mixed_parent_prob) / 2
        concepts: list[int] = []
        edges: list[tuple[int, int]] = []
        for node in range(2, n):
            if entity[node]:
                continue
            roll = rng.random()
            pool = anywhere if roll < cfg.mixed_parent_prob else root_side if roll < one_side else other_side
            parents = pool.draw(rng, bisect.bisect_right(in_degree_cdf, rng.random()) + 1)
            for parent in parents:
                edges.append((parent, node))
                label[node] |= label[parent]
            depth[node] = 1 + max(depth[p] for p in parents)
            weight = 1.0 + cfg.depth_weight * depth[node]
            anywhere.add(node, weight)
            if label[node] != 3:
                (root_side if label[node] == 1 else other_side).add(node, weight)
            concepts.append(node)
        for extra in (v for v in range(2, n) if entity[v]):
            if concepts:
                k = bisect.bisect_right(in_degree_cdf, rng.random()) + 1
                edges += [(extra, v) for v in rng.sample(concepts, min(len(concepts), k))]
        successors = GraphInstance(n, edges, 0, [], 0).successors()
        hops = [hops_from(successors, entity) for entity in (0, 1)]
        sinks = [[v for v in concepts if not successors[v] and label[v] == 1 << entity] for entity in (0, 1)]
        deepest = [max((hops[e][v] for v in sinks[e]), default=0) for e in (0, 1)]
        root = 0 if deepest[0] > deepest[1] or (deepest[0] == deepest[1] and rng.random() < 0.5) else 1
        if not cfg.min_hops <= deepest[root] <= cfg.max_hops or not sinks[1 - root]:
            return None
        target = rng.choice([v for v in sinks[root] if hops[root][v] == deepest[root]])
        neg_target = rng.choice(sinks[1 - root])
        asked = [target, neg_target] if rng.random() < 0.5 else [neg_target, target]
        return GraphInstance(n, edges, root, asked, target)

    def generate(self) -> list[GraphInstance]:
        rng = random.Random(self.cfg.seed)
        in_degree_cdf = positive_poisson_cdf(self.cfg.in_degree_rate)
        total = self.cfg.n_train + self.cfg.n_valid + self.cfg.n_test
        out: list[GraphInstance] = []
        failures = 0
        while len(out) < total:
            instance = self.sample_instance(rng, in_degree_cdf)
            if instance is not None:
                out.append(instance)
                failures = 0
                continue
            failures += 1
            if failures == MAX_TRIES:
                raise TaskConfigError(
                    f"no graph with a target {self.cfg.min_hops}..{self.cfg.max_hops} hops from the root in "
                    f"{MAX_TRIES} tries with task.max_nodes={self.cfg.max_nodes}: raise max_nodes or lower min_hops"
                )
        return out

    # -- importer ------------------------------------------------------------------------
    @cached_property
    def imported(self) -> Imported:
        """Coconut's records that hold together; the others by index with the reason they were skipped."""
        path = Path(self.cfg.source)
        try:
            records = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TaskConfigError(f"task.source={path} is not a readable JSON file: {exc}") from exc
        if not isinstance(records, list):
            raise TaskConfigError(f"task.source={path} holds a {type(records).__name__}, not a list of records")
        kept = Imported([], [], {})
        for index, record in enumerate(records):
            parsed = self.parse_record(record)
            if isinstance(parsed, str):
                kept.skipped[str(index)] = parsed
                continue
            kept.instances.append(parsed)
            kept.notes.append({"source_index": index, "symbols": record["idx_to_symbol"]})
        if not kept.instances:
            first = next(iter(kept.skipped.items()), None)
            why = f" (record {first[0]}: {first[1]})" if first else ""
            raise TaskConfigError(f"task.source={path} has no usable record among {len(records)}{why}")
        return kept

    def parse_record(self, record: Any) -> GraphInstance | str:
        """A Coconut record as an instance, or the reason it cannot be one."""
        if not isinstance(record, dict):
            return f"record is a {type(record).__name__}, not an object"
        missing = [f for f in RECORD_FIELDS if f not in record]
        if missing:
            return f"missing field {', '.join(missing)}"
        symbols = record["idx_to_symbol"]
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            return "idx_to_symbol is not a list of names"
        n = len(symbols)
        if not 2 <= n <= self.cfg.max_nodes:
            return f"{n} nodes, allowed 2..task.max_nodes={self.cfg.max_nodes}"
        for key in ("root", "target", "neg_target"):
            value = record[key]
            if not isinstance(value, int) or not 0 <= value < n:
                return f"{key} {value!r} is not a node index 0..{n - 1}"
        edges = record["edges"]
        if not isinstance(edges, list):
            return "edges is not a list"
        for i, edge in enumerate(edges):
            if not (isinstance(edge, list) and len(edge) == 2 and all(isinstance(v, int) and 0 <= v < n for v in edge)):
                return f"edge {i} {edge!r} is not a pair of node indices 0..{n - 1}"
        root, target, neg_target = record["root"], record["target"], record["neg_target"]
        instance = GraphInstance(n, [(u, v) for u, v in edges], root, [], target)
        hops = hops_from(instance.successors(), root)
        if target == root:
            return f"target {target} is the root"
        if target not in hops:
            return f"target {target} is not reachable from root {root}"
        if neg_target in hops:
            return f"neg_target {neg_target} is reachable from root {root}"
        if hops[target] > self.cfg.n_steps:
            return f"target {target} is {hops[target]} hops from root {root}, more than task.n_steps={self.cfg.n_steps}"
        match = QUESTION_END.search(record["question"]) if isinstance(record["question"], str) else None
        if match is None:
            return "question does not end with 'Is <root> a <name> or <name>?'"
        asked = list(match.groups()[1:])
        by_name = {symbols[target]: target, symbols[neg_target]: neg_target}
        if match.group(1) != symbols[root] or sorted(asked) != sorted(by_name) or len(by_name) < 2:
            return f"question asks {match.group(0)!r}, not about root {symbols[root]!r}, target and neg_target"
        answer = record["answer"]
        if not isinstance(answer, str) or not re.search(rf"\b{re.escape(symbols[target])}\b", answer):
            return f"answer {answer!r} does not name target {symbols[target]!r}"
        instance.asked = [by_name[a] for a in asked]
        return instance

    # -- dataset -------------------------------------------------------------------------
    def build(self) -> TaskData:
        cfg = self.cfg
        if cfg.source is None:
            instances, notes = self.generate(), None
            split = split_ids(cfg.n_train, cfg.n_valid, cfg.n_test)
        else:
            instances, notes = self.imported.instances, self.imported.notes
            split = torch.full((len(instances),), SPLITS.index(cfg.source_split), dtype=torch.long)
        encoded = self.encode(instances, cfg.seed)
        extra, target, asked = encoded.extra, encoded.extra["goal"], encoded.extra["asked"]
        neg_target = torch.where(asked[:, 0] == target, asked[:, 1], asked[:, 0])
        columns = (target.tolist(), neg_target.tolist(), self.query_hops(extra, target).tolist(), split.tolist())
        for i, (record, t, neg, hops, s) in enumerate(zip(encoded.records, *columns, strict=True)):
            record.update(target=t, neg_target=neg, answer=t, hops=hops, split=SPLITS[s])
            if notes:
                symbols = [None] * self.n_node_tokens
                for node, renamed in enumerate(encoded.names[i, : instances[i].n_nodes].tolist()):
                    symbols[renamed] = notes[i]["symbols"][node]
                record.update(source_index=notes[i]["source_index"], symbols=symbols)
        return TaskData(
            vocab=self.vocab,
            prompt=encoded.prompt,
            trace=encoded.trace,
            answer=self.node_offset + target,
            split=split,
            extra=extra,
            records=encoded.records,
        )

    def statistics(self, data: TaskData) -> dict[str, Any]:
        stats = {**super().statistics(data), **self.graph_statistics(data, data.extra["goal"])}
        first = data.extra["asked"][:, 0] == data.extra["goal"]
        stats["target_asked_first"] = f"{int(first.sum())}/{first.numel()} ({first.float().mean():.2f})"
        if self.cfg.source is not None:
            kept, skipped = len(self.imported.instances), self.imported.skipped
            stats["source"] = Path(self.cfg.source).name
            stats["records_kept"] = f"{kept} of {kept + len(skipped)}"
            stats["skipped"] = skipped or "none"
        return stats
