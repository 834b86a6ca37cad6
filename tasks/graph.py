"""What ProsQA and ProntoQA share: graphs as symbolic prompts, walks from the root, and CSFT targets over them.

An instance is a directed graph over nodes 0..n-1, a root, the question's nodes and a goal: the node the
discrete trace walks to. Node names carry no meaning: each instance renames its nodes to node tokens
`N0..N{M-1}` by a random permutation and shuffles its edges before anything is encoded; every later rule
(which shortest path the trace takes, how walks are ordered) uses the renamed ids.

Prompt: `<BOS> u v u v ... u v ? q1 [q2] -> root` (edge u -> v reads "every u is a v"). No separator between
edges: left padding keeps every edge's source at the same parity, and the prompt is a third shorter than with one.
The root comes last, so every position from it on asks the same thing: the successors of the node(s) it holds
(the root, then each step's mixture); with the root earlier, the first step would first have to fetch it.
With `sink_loops`, the edge list also holds `s s` for every node without successors (shuffled in with the
edges; the instance's edges, records and statistics stay as they were): a walk staying at a sink then follows
a listed edge like any other, where otherwise the model would have to notice that no edge starts there.

Walks: a search step moves from a node along each of its outgoing edges; a node without outgoing edges, and
the goal once reached, stays where it is (a self-loop), so every walk from the root has exactly S steps.
Walks are ordered: those that reach the goal first, sooner before later, ties in lexicographic order of
their node ids; the others after them, lexicographically. The discrete trace is the first walk. Over the
first B walks, the CSFT target at step t weighs each node by the number of distinct t-step prefixes ending
there: B = all walks gives the nodes reached by t-step walks, each weighted by the number of walks reaching
it, and B = 1 gives exactly the one-hot trace.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from tasks.base import ARROW, BOS, EOS, PAD, Task, TaskConfigError, TaskData, resolve_budget

QUESTION = "?"


@dataclass
class GraphInstance:
    """One instance in its generator's (or source file's) node ids 0..n_nodes-1."""

    n_nodes: int
    edges: list[tuple[int, int]]
    root: int
    asked: list[int]  # the question's nodes after the root, in the order the question names them
    goal: int  # the node the discrete trace walks to

    def successors(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.n_nodes)]
        for u, v in self.edges:
            out[u].append(v)
        return out


def hops_from(successors: Sequence[Sequence[int]], source: int) -> dict[int, int]:
    """Shortest number of edges from `source` to every node it reaches (BFS, for generators and importers)."""
    dist = {source: 0}
    frontier = [source]
    for node in frontier:
        for nxt in successors[node]:
            if nxt not in dist:
                dist[nxt] = dist[node] + 1
                frontier.append(nxt)
    return dist


def edge_tensor(instances: Sequence[GraphInstance]) -> torch.Tensor:
    """[N, E, 2] long edge lists padded with -1."""
    width = max(1, max(len(g.edges) for g in instances))
    flat = [x for g in instances for edge in g.edges + [(-1, -1)] * (width - len(g.edges)) for x in edge]
    return torch.tensor(flat, dtype=torch.long).view(len(instances), width, 2)


def adjacency(edges: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """[N, M, M] bool from [N, E, 2] padded edge lists."""
    n = edges.shape[0]
    src, dst = edges[..., 0].long(), edges[..., 1].long()
    present = src >= 0
    row = torch.arange(n).unsqueeze(1).expand_as(src)
    adj = torch.zeros(n, n_nodes, n_nodes, dtype=torch.bool)
    adj[row[present], src[present], dst[present]] = True
    return adj


def bfs_hops(adj: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """[N, M] long: edges on the shortest path from `source` to each node, -1 where unreachable."""
    n, m, _ = adj.shape
    reach = torch.zeros(n, m, dtype=torch.bool)
    reach[torch.arange(n), source] = True
    hops = torch.where(reach, 0, -1)
    step = adj.float()
    for t in range(1, m):
        grown = reach | (torch.bmm(reach.float().unsqueeze(1), step).squeeze(1) > 0)
        if torch.equal(grown, reach):
            break
        hops = torch.where(grown & ~reach, t, hops)
        reach = grown
    return hops


def with_sink_loops(edges: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """[N, E + K, 2]: the edges, then `s s` for every node that is on an edge but has no successor (-1 padded)."""
    n = edges.shape[0]
    adj = adjacency(edges, n_nodes)
    sink = adj.any(1) & ~adj.any(2)  # some edge ends there, none starts there
    width = max(1, int(sink.sum(1).max()))
    ids = torch.where(sink, torch.arange(n_nodes), n_nodes).sort(1).values[:, :width]
    loops = torch.where((ids < n_nodes).unsqueeze(-1), ids.unsqueeze(-1).expand(n, width, 2), -1)
    return torch.cat([edges, loops], 1)


def walk_moves(adj: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """[N, M, M] bool one-step moves: the edges, with a self-loop instead at sinks and at the goal."""
    n = adj.shape[0]
    stay = ~adj.any(-1)
    stay[torch.arange(n), goal] = True
    return (adj & ~stay.unsqueeze(-1)) | torch.diag_embed(stay)


def first_walks(adj: torch.Tensor, root: torch.Tensor, goal: torch.Tensor, n_steps: int) -> torch.Tensor:
    """[N, S] the discrete traces: the lexicographically first shortest path to the goal, then staying there."""
    n = adj.shape[0]
    moves = walk_moves(adj, goal)
    to_goal = bfs_hops(adj.transpose(1, 2), goal)  # -1 where the goal is out of reach
    rows = torch.arange(n)
    node, out = root, []
    for _ in range(n_steps):
        here = moves[rows, node]
        left = to_goal[rows, node]
        closer = here & (to_goal == (left - 1).unsqueeze(1)) & (left > 0).unsqueeze(1)
        node = torch.where(closer.any(1), closer.to(torch.int8).argmax(1), here.to(torch.int8).argmax(1))
        out.append(node)
    return torch.stack(out, 1)


def walk_counts(moves: torch.Tensor, root: torch.Tensor, n_steps: int) -> torch.Tensor:
    """[N, S+1, M] float64: number of t-step walks from the root ending at each node, t = 0..S."""
    n, m, _ = moves.shape
    count = torch.zeros(n, m, dtype=torch.float64)
    count[torch.arange(n), root] = 1.0
    out = [count]
    step = moves.to(torch.float64)
    for _ in range(n_steps):
        count = torch.bmm(count.unsqueeze(1), step).squeeze(1)
        out.append(count)
    return torch.stack(out, 1)


def group_starts(owner: torch.Tensor, n: int) -> torch.Tensor:
    """[n] index of each instance's first row in a flat tensor grouped by `owner` (ascending)."""
    counts = torch.bincount(owner, minlength=n)
    return torch.cumsum(counts, 0) - counts


def enumerate_walks(
    moves: torch.Tensor,
    root: torch.Tensor,
    n_steps: int,
    deadline: torch.Tensor | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S-step walks from each root, flat: walks [T, S+1] and their instance [T], grouped by instance and in
    lexicographic order within it.

    `deadline` [N, M] keeps only the walks that are at every node no later than its deadline (-1: never there);
    `limit` keeps only each instance's lexicographically first `limit` walks (every prefix extends to a walk,
    so cutting prefixes early is exact).
    """
    n, m, _ = moves.shape
    ids = torch.arange(m).expand(n, m, m)
    successors = torch.where(moves, ids, m + ids).sort(-1).values  # ascending, then padding >= m
    degree = moves.sum(-1)
    walks, owner = root.view(n, 1), torch.arange(n)
    for t in range(n_steps):
        last = walks[:, -1]
        fanout = degree[owner, last]
        parent = torch.repeat_interleave(torch.arange(len(walks)), fanout)
        slot = torch.arange(len(parent)) - (torch.cumsum(fanout, 0) - fanout)[parent]
        owner = owner[parent]
        nxt = successors[owner, last[parent], slot]
        walks = torch.cat([walks[parent], nxt.unsqueeze(1)], 1)
        if deadline is not None:
            keep = deadline[owner, nxt] > t
            walks, owner = walks[keep], owner[keep]
        if limit is not None:
            keep = torch.arange(len(owner)) - group_starts(owner, n)[owner] < limit
            walks, owner = walks[keep], owner[keep]
    return walks, owner


def merge_walks(walks: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat walks from several enumerations, grouped by instance again, lexicographic within it, repeats dropped."""
    order = torch.arange(len(owner))
    for t in reversed(range(walks.shape[1])):  # least significant step first, every sort stable
        order = order[torch.argsort(walks[order, t], stable=True)]
    order = order[torch.argsort(owner[order], stable=True)]
    walks, owner = walks[order], owner[order]
    repeat = torch.cat([torch.zeros(1, dtype=torch.bool), (walks[1:] == walks[:-1]).all(1) & (owner[1:] == owner[:-1])])
    return walks[~repeat], owner[~repeat]


def budget_targets(
    walks: torch.Tensor, owner: torch.Tensor, goal: torch.Tensor, budget: int, n_node_tokens: int
) -> torch.Tensor:
    """[N, S, M] targets over each instance's first `budget` walks: distinct t-step prefixes per node, normalised.

    walks [T, S+1] and owner [T] are grouped by instance, lexicographic within it (as `merge_walks` leaves them).
    """
    n, (total, length) = len(goal), walks.shape
    hit = walks == goal[owner].unsqueeze(1)
    hit_time = torch.where(hit.any(1), hit.to(torch.int8).argmax(1), length)
    order = torch.argsort((owner * (length + 1) + hit_time) * total + torch.arange(total))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(total) - group_starts(owner, n)[owner[order]]
    walks, owner = walks[rank < budget], owner[rank < budget]  # still lexicographic within each instance
    differs = (walks[1:] != walks[:-1]).cumsum(1) > 0  # the prefix up to step t differs from the previous walk's
    first = torch.cat([torch.ones(1, dtype=torch.bool), owner[1:] != owner[:-1]]).unsqueeze(1)
    new_prefix = torch.cat([torch.ones(1, length, dtype=torch.bool), differs]) | first
    out = torch.zeros(n, length - 1, n_node_tokens)
    step = torch.arange(length - 1).expand(len(owner), -1)
    out.index_put_((owner.unsqueeze(1).expand_as(step), step, walks[:, 1:]), new_prefix[:, 1:].float(), accumulate=True)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12)


def mean_max(values: torch.Tensor) -> dict[str, float]:
    return {"mean": round(float(values.double().mean()), 2), "max": int(values.max())}


def graph_statistics(edges: torch.Tensor, n_nodes: torch.Tensor, hops: torch.Tensor) -> dict[str, Any]:
    """Nodes, edges and the root -> query hops histogram: the figures compared with Coconut's data."""
    histogram = {("unreachable" if h < 0 else str(h)): c for h, c in sorted(Counter(hops.tolist()).items())}
    return {"nodes": mean_max(n_nodes), "edges": mean_max((edges[..., 0] >= 0).sum(1)), "hops": histogram}


def check_range(name: str, value: int, lo: int, hi: int | None = None) -> None:
    """Raise TaskConfigError unless lo <= value (<= hi)."""
    if value < lo or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise TaskConfigError(f"task.{name}={value} is out of range: allowed {allowed}")


def check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise TaskConfigError(f"task.{name}={value} is out of range: allowed 0..1")


def check_sizes(cfg: Any) -> None:
    for split in ("train", "valid", "test"):
        check_range(f"n_{split}", getattr(cfg, f"n_{split}"), 0)
    if cfg.n_train + cfg.n_valid + cfg.n_test == 0:
        raise TaskConfigError("task.n_train, n_valid and n_test are all 0: need at least one instance")


def split_ids(n_train: int, n_valid: int, n_test: int) -> torch.Tensor:
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate((n_train, n_valid, n_test))])


@dataclass
class Encoded:
    """A task's instances as tensors (token ids, or node ids in `extra`) and as records (node ids k = token Nk)."""

    prompt: torch.Tensor
    trace: torch.Tensor
    extra: dict[str, torch.Tensor]
    records: list[dict[str, Any]]
    names: torch.Tensor  # [N, M]: the renamed id of each instance's node i


class GraphTask(Task):
    """A reachability task over per-instance graphs; subclasses generate or import `GraphInstance`s.

    `extra` holds, in renamed node ids (token id - node_offset): edges [N, E, 2] (-1 padded), root, goal
    and n_nodes [N], asked [N, A] (the question's nodes after the root).
    """

    def __init__(self, cfg: Any, n_node_tokens: int, answer_tokens: Sequence[str] = ()):
        # a plain dataclass: OmegaConf attribute access (~50 us) would dominate the generator loops
        super().__init__(self.Config(**OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else cfg)
        self.n_node_tokens = n_node_tokens
        self.vocab = [PAD, BOS, EOS, ARROW, QUESTION, *answer_tokens]
        self.node_offset = len(self.vocab)
        self.vocab += [f"N{i}" for i in range(n_node_tokens)]

    @property
    def n_steps(self) -> int:
        return int(self.cfg.n_steps)

    def fingerprint(self) -> Any:
        # the prompt layout is part of the data: datasets written with an earlier layout get another name
        return {**super().fingerprint(), "encoding": "edge-pairs, root last"}

    def encode(self, instances: Sequence[GraphInstance], seed: int) -> Encoded:
        """Rename each instance's nodes and shuffle its edges (seeded), then encode it as tensors and a record."""
        n, m = len(instances), self.n_node_tokens
        gen = torch.Generator().manual_seed(seed)
        names = torch.rand(n, m, generator=gen).argsort(1)  # instance b calls its node i names[b, i]
        edges = edge_tensor(instances)
        present = edges[..., 0] >= 0
        edges = torch.where(present.unsqueeze(-1), names.gather(1, edges.clamp_min(0).flatten(1)).view_as(edges), -1)
        shuffle = torch.where(present, torch.rand(present.shape, generator=gen), 2.0).argsort(1)
        edges = edges.gather(1, shuffle.unsqueeze(-1).expand_as(edges))
        listed = edges
        if self.cfg.sink_loops:
            listed = with_sink_loops(edges, m)
            used = listed[..., 0] >= 0
            mix = torch.where(used, torch.rand(used.shape, generator=gen), 2.0).argsort(1)
            listed = listed.gather(1, mix.unsqueeze(-1).expand_as(listed))
        root = names.gather(1, torch.tensor([[g.root] for g in instances])).flatten()
        goal = names.gather(1, torch.tensor([[g.goal] for g in instances])).flatten()
        asked = names.gather(1, torch.tensor([g.asked for g in instances]).view(n, -1))
        trace = first_walks(adjacency(edges, m), root, goal, self.n_steps)
        extra = {
            "edges": edges.to(torch.int16),  # node ids < 2^15; a quarter of the bytes on disk
            "root": root,
            "goal": goal,
            "asked": asked,
            "n_nodes": torch.tensor([g.n_nodes for g in instances]),
        }
        flat, width = edges.flatten().tolist(), 2 * edges.shape[1]
        records = []
        for i, (count, r, ask, walk) in enumerate(
            zip(present.sum(1).tolist(), root.tolist(), asked.tolist(), trace.tolist(), strict=True)
        ):
            ends = flat[i * width : i * width + 2 * count]
            pairs = list(zip(ends[::2], ends[1::2], strict=True))
            records.append({"edges": pairs, "root": r, "question": [r, *ask], "trace": walk})
        return Encoded(self.prompt(listed, root, asked), self.node_offset + trace, extra, records, names)

    def prompt(self, edges: torch.Tensor, root: torch.Tensor, asked: torch.Tensor) -> torch.Tensor:
        """[N, P] `<BOS> u v ... u v ? asked.. -> root`, left-padded with <PAD> (id 0)."""
        n = edges.shape[0]
        body = (self.node_offset + edges).flatten(1)  # [N, 2E]
        body_used = (edges[..., 0] >= 0).repeat_interleave(2, 1)
        head = torch.full((n, 1), self.vocab.index(BOS))
        tail = torch.cat(
            [
                torch.full((n, 1), self.vocab.index(QUESTION)),
                self.node_offset + asked,
                torch.full((n, 1), self.vocab.index(ARROW)),
                self.node_offset + root.view(n, 1),
            ],
            1,
        )
        tokens = torch.cat([head, body, tail], 1)
        used = torch.cat([torch.ones(n, 1, dtype=torch.bool), body_used, torch.ones_like(tail, dtype=torch.bool)], 1)
        order = torch.where(used, torch.arange(tokens.shape[1]), -1).argsort(dim=1, stable=True)  # padding first
        return torch.where(used, tokens, 0).gather(1, order)

    def query_hops(self, extra: dict[str, torch.Tensor], query: torch.Tensor) -> torch.Tensor:
        """[N] shortest root -> query hops, -1 where the query is unreachable."""
        hops = bfs_hops(adjacency(extra["edges"], self.n_node_tokens), extra["root"])
        return hops.gather(1, query.view(-1, 1)).flatten()

    def moves(self, data: TaskData) -> torch.Tensor:
        return walk_moves(adjacency(data.extra["edges"], self.n_node_tokens), data.extra["goal"])

    def walk_totals(self, data: TaskData) -> torch.Tensor:
        """[N] number of S-step walks from the root of each instance."""
        return walk_counts(self.moves(data), data.extra["root"], self.n_steps)[:, -1].sum(-1).round().long()

    def max_budget(self, data: TaskData) -> int:
        return int(self.walk_totals(data).max())

    def step_targets(self, data: TaskData, budget: int | None = None) -> torch.Tensor:
        s, root, goal = self.n_steps, data.extra["root"], data.extra["goal"]
        adj = adjacency(data.extra["edges"], self.n_node_tokens)
        moves = walk_moves(adj, goal)
        counts = walk_counts(moves, root, s)[:, 1:]
        totals = counts[:, -1].sum(-1).round()  # S-step walks per instance, as walk_totals counts them
        budget = resolve_budget(budget, int(totals.max()))
        nodes = (counts / counts.sum(-1, keepdim=True)).float()
        over = torch.nonzero(totals > budget).flatten()  # instances with walks left out
        if len(over):
            # an instance's first B walks are among those reaching the goal and its lexicographically first B
            to_goal = bfs_hops(adj[over].transpose(1, 2), goal[over])
            deadline = torch.where(to_goal >= 0, s - to_goal, -1)
            moves_over, root_over = moves[over], root[over]
            reaching = enumerate_walks(moves_over, root_over, s, deadline=deadline)
            first = enumerate_walks(moves_over, root_over, s, limit=budget)
            walks, owner = merge_walks(*map(torch.cat, zip(reaching, first, strict=True)))
            nodes[over] = budget_targets(walks, owner, goal[over], budget, self.n_node_tokens)
        out = torch.zeros(len(root), s, len(self.vocab))
        out[..., self.node_offset :] = nodes
        return out

    def graph_statistics(self, data: TaskData, query: torch.Tensor) -> dict[str, Any]:
        extra = data.extra
        stats = graph_statistics(extra["edges"], extra["n_nodes"], self.query_hops(extra, query))
        return {**stats, "walks": mean_max(self.walk_totals(data))}
