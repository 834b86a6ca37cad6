"""ProntoQA (Saparov & He) as CoT2 casts it: is the queried concept reachable from the root within n_hops steps?

Generator: a fictional ontology as a forest of two trees. In each, an entity starts a chain of n_hops concepts
(entity -> c1 -> ... -> c_h, "every c_i is a c_{i+1}"), and each entity or chain concept below c_h grows up
to `max_branches` distractor branches (with probability `branch_prob` each): short paths of new concepts that
end at most n_hops steps from the entity, so whatever the root reaches, it reaches within n_hops steps. The
root is the first tree's entity. The query is the end of the root's chain (answer True) or of the other
tree's chain (False): both lie n_hops steps below an entity, so only walking from the root tells them apart.
Answers are balanced 50/50 in every split.

The defaults give every entity and chain concept one distractor, as ProntoQA gives every hop one distractor
rule. The node tokens cover the largest possible instance (30 here): allowing two branches per concept gave the
same average graph but 48 node tokens, more than a d=32 model keeps apart (mass leaked onto absent nodes).

Sequence (S = n_hops): prompt `<BOS> u v ... u v ? query -> root`, then the root's chain c1..c_h (the chain
actually walked, whatever the answer), then `True` or `False`. CSFT targets spread over every walk from the
root, with the chain end as the goal the walks are ordered by (see tasks.graph).

At the defaults (10,000 instances, seed 0): nodes 25.99 mean / 30 max, edges 23.99 / 28, 5-step walks from
the root 6.0 / 6, answers True 5000 / False 5000.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from tasks.base import SPLITS, TaskData
from tasks.graph import GraphInstance, GraphTask, check_probability, check_range, check_sizes, split_ids

TRUE, FALSE = "True", "False"


@dataclass
class ProntoQAConfig:
    name: str = "prontoqa"
    n_train: int = field(default=9_000, metadata={"help": "training instances"})
    n_valid: int = field(default=200, metadata={"help": "validation instances"})
    n_test: int = field(default=800, metadata={"help": "test instances"})
    seed: int = field(default=0, metadata={"help": "seed of the ontologies, the answers and the node names"})
    n_hops: int = field(default=5, metadata={"help": "chain length from the root; also the reasoning steps S"})
    max_branches: int = field(default=1, metadata={"help": "most distractor branches per chain node"})
    branch_prob: float = field(default=1.0, metadata={"help": "chance each possible distractor branch exists"})
    max_branch_length: int = field(default=2, metadata={"help": "most concepts on one distractor branch"})
    sink_loops: bool = field(
        default=False,
        metadata={"help": "the prompt also lists `s s` for each node without successors: staying is then a lookup"},
    )


class ProntoQA(GraphTask):
    name = "prontoqa"
    Config = ProntoQAConfig

    def __init__(self, cfg: Any):
        check_sizes(cfg)
        check_range("n_hops", cfg.n_hops, 1)
        check_range("max_branches", cfg.max_branches, 0)
        check_range("max_branch_length", cfg.max_branch_length, 1)
        check_probability("branch_prob", cfg.branch_prob)
        h = cfg.n_hops
        per_tree = 1 + h + cfg.max_branches * sum(min(cfg.max_branch_length, h - depth) for depth in range(h))
        super().__init__(cfg, 2 * per_tree, answer_tokens=(TRUE, FALSE))

    @property
    def n_steps(self) -> int:
        return int(self.cfg.n_hops)

    def sample_instance(self, rng: random.Random, answer: bool) -> GraphInstance:
        """Two trees, each an entity's chain with distractor branches; the query ends the root's chain iff answer."""
        cfg, h = self.cfg, self.cfg.n_hops
        edges: list[tuple[int, int]] = []
        chains = []
        n = 0
        for _ in range(2):
            chain = list(range(n, n + h + 1))
            n += h + 1
            edges += zip(chain, chain[1:], strict=False)
            for depth, node in enumerate(chain[:-1]):
                for _ in range(cfg.max_branches):
                    if rng.random() >= cfg.branch_prob:
                        continue
                    length = rng.randint(1, min(cfg.max_branch_length, h - depth))
                    branch = [node, *range(n, n + length)]
                    n += length
                    edges += zip(branch, branch[1:], strict=False)
            chains.append(chain)
        query = chains[0][-1] if answer else chains[1][-1]
        return GraphInstance(n, edges, chains[0][0], [query], chains[0][-1])

    def build(self) -> TaskData:
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        answers: list[bool] = []
        for size in (cfg.n_train, cfg.n_valid, cfg.n_test):
            balanced = [i % 2 == 0 for i in range(size)]
            rng.shuffle(balanced)
            answers += balanced
        instances = [self.sample_instance(rng, answer) for answer in answers]
        split = split_ids(cfg.n_train, cfg.n_valid, cfg.n_test)
        encoded = self.encode(instances, cfg.seed)
        query = encoded.extra["asked"][:, 0]
        columns = (query.tolist(), self.query_hops(encoded.extra, query).tolist(), answers, split.tolist())
        for record, q, hops, answer, s in zip(encoded.records, *columns, strict=True):
            answer_word = TRUE if answer else FALSE
            record.update(query=q, answer=answer_word, hops=hops if hops >= 0 else None, split=SPLITS[s])
        answer_ids = torch.where(torch.tensor(answers), self.vocab.index(TRUE), self.vocab.index(FALSE))
        return TaskData(
            vocab=self.vocab,
            prompt=encoded.prompt,
            trace=encoded.trace,
            answer=answer_ids,
            split=split,
            extra=encoded.extra,
            records=encoded.records,
        )

    def statistics(self, data: TaskData) -> dict[str, Any]:
        stats = {**super().statistics(data), **self.graph_statistics(data, data.extra["asked"][:, 0])}
        true = int((data.answer == self.vocab.index(TRUE)).sum())
        stats["answers"] = {TRUE: true, FALSE: data.answer.numel() - true}
        return stats
