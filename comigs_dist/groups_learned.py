"""Learned sharing groups: users clustered by the similarity of their shared LoRA updates.

Owns the computation that turns per-user update vectors (the flat deltas of a user's shared
tensors since the warm-up started) into sharing groups, in the spirit of FedLEASE (NeurIPS 2025):
- the cosine similarity of every pair of users, over the whole vector or averaged over blocks
  (FedLEASE averages it over layers and projections);
- the number of groups: given, or chosen by the largest eigengap of the normalised Laplacian of
  the similarity (the default: it can answer "one group" when every user is alike), or by
  FedLEASE's best silhouette over 2..max_k (which never answers one group);
- the partition: average-linkage agglomerative clustering of the cosine distance 1 - similarity
  (FedLEASE's), merging the tied pair with the smallest users first.
Groups come out as comm.groups takes them: lists of users, each sorted, the lists sorted by their
smallest member (``methods/comigs_learned.py`` builds one process group per group).
numpy in float64 only (no scikit-learn: not a dependency, and its tie-breaking is its own).
Knows nothing of torch.distributed, models or methods. docs/methods-since-the-paper.md explains
the choices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

RULES = ("eigengap", "silhouette")
_DIGITS = 12  # scores and linkage distances closer than this are ties, broken by the smaller k or users


def _as_matrix(vectors: Any) -> np.ndarray:
    """(users, d) float64 from a 2-D array or tensor, or a sequence of 1-D ones of one length."""
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().cpu().numpy()
    if isinstance(vectors, (list, tuple)):
        rows = [np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float64).reshape(-1)
                for v in vectors]
        lengths = sorted({r.size for r in rows})
        if len(lengths) > 1:
            raise ValueError(f"update vectors must have one length for every user; got lengths {lengths}")
        return np.stack(rows) if rows else np.zeros((0, 0))
    m = np.asarray(vectors, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"update vectors must be (users, d); got shape {m.shape}")
    return m


def _cosine(m: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows; a zero row is 0 to every other row (and 1 to itself)."""
    norms = np.linalg.norm(m, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = m / safe[:, None]
    s = unit @ unit.T
    s = (s + s.T) / 2                          # exactly symmetric, whatever the product's rounding
    np.fill_diagonal(s, 1.0)
    return np.clip(s, -1.0, 1.0)


def compute_cosine_similarity(vectors: Any, blocks: Sequence[int] | None = None) -> np.ndarray:
    """(users, users) cosine similarity of the update vectors; with ``blocks`` (lengths that add up
    to the vectors' length, e.g. one per shared tensor), the mean over blocks of each block's
    cosine similarity, so that every block counts alike whatever its norm."""
    m = _as_matrix(vectors)
    if blocks is None:
        return _cosine(m)
    blocks = [int(b) for b in blocks]
    if any(b <= 0 for b in blocks) or sum(blocks) != m.shape[1]:
        raise ValueError(f"blocks {blocks} must be positive lengths adding up to the vectors' length {m.shape[1]}")
    bounds = np.cumsum([0] + blocks)
    return np.mean([_cosine(m[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], axis=0)


def compute_average_linkage(distance: np.ndarray, k: int) -> list[list[int]]:
    """Average-linkage (UPGMA) agglomerative clustering of a symmetric distance matrix into k
    groups. Each step merges the two groups of smallest mean pairwise distance; a tie goes to the
    pair met first with groups ordered by their smallest member."""
    d = np.array(distance, dtype=np.float64)
    n = d.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"the number of groups ({k}) must be between 1 and the number of users ({n})")
    groups = [[i] for i in range(n)]
    between = d.copy()                         # between[a, b]: mean distance of groups a and b
    while len(groups) > k:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                value = round(float(between[a, b]), _DIGITS)
                if best is None or value < best[0]:
                    best = (value, a, b)
        _, a, b = best
        na, nb = len(groups[a]), len(groups[b])
        merged = (na * between[a] + nb * between[b]) / (na + nb)   # Lance-Williams update for UPGMA
        between[a], between[:, a] = merged, merged
        between[a, a] = 0.0
        between = np.delete(np.delete(between, b, axis=0), b, axis=1)
        groups[a] = sorted(groups[a] + groups[b])  # a < b: the groups stay ordered by smallest member
        del groups[b]
    return groups


def compute_eigengap_scores(similarity: np.ndarray, max_k: int) -> dict[int, float]:
    """For k = 1..min(max_k, n - 1): the gap lambda_{k+1} - lambda_k between consecutive
    eigenvalues (ascending) of the normalised Laplacian I - D^-1/2 W D^-1/2, with the affinity W
    the similarity clipped at 0 (a negative cosine is no affinity). A large gap after k
    eigenvalues means k weakly connected groups; every user alike gives the largest gap at k = 1."""
    w = np.clip(np.array(similarity, dtype=np.float64), 0.0, None)
    np.fill_diagonal(w, 1.0)
    scale = 1.0 / np.sqrt(w.sum(axis=1))
    lap = np.eye(len(w)) - scale[:, None] * w * scale[None, :]
    lam = np.linalg.eigvalsh((lap + lap.T) / 2)
    return {k: float(lam[k] - lam[k - 1]) for k in range(1, min(max_k, len(w) - 1) + 1)}


def compute_silhouette(distance: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """Mean silhouette of the users under a grouping of a precomputed distance: (b - a) / max(a, b)
    with a the mean distance to the user's own group and b the smallest mean distance to another
    group; 0 for a user alone in its group."""
    d = np.asarray(distance, dtype=np.float64)
    label = {u: g for g, members in enumerate(groups) for u in members}
    values = []
    for u in range(len(d)):
        own = [v for v in groups[label[u]] if v != u]
        if not own:
            values.append(0.0)
            continue
        a = float(d[u, own].mean())
        b = min(float(d[u, list(members)].mean()) for g, members in enumerate(groups) if g != label[u])
        values.append(0.0 if max(a, b) == 0 else (b - a) / max(a, b))
    return float(np.mean(values))


@dataclass(frozen=True)
class LearnedGroups:
    """The groups chosen for a set of users, and why."""
    groups: list[list[int]]            # sorted lists of users, ordered by smallest member
    rule: str                          # 'given', 'eigengap' or 'silhouette'
    scores: dict[int, float]           # the rule's score of every candidate number of groups
    similarity: np.ndarray             # (users, users) cosine similarity

    @property
    def k(self) -> int:
        return len(self.groups)

    def labels(self) -> list[int]:
        """Each user's group index."""
        out = [0] * sum(len(g) for g in self.groups)
        for g, members in enumerate(self.groups):
            for u in members:
                out[u] = g
        return out

    def summary(self) -> dict:
        """What results.json and the logs record: the groups, the rule and its scores, and the
        similarity matrix (rounded to 6 digits)."""
        return {"groups": [list(g) for g in self.groups], "rule": self.rule,
                "scores": {str(k): round(v, 6) for k, v in self.scores.items()},
                "similarity": np.round(self.similarity, 6).tolist()}


def compute_learned_groups(vectors: Any, *, k: int | None = None, rule: str = "eigengap", max_k: int | None = None,
                           blocks: Sequence[int] | None = None) -> LearnedGroups:
    """The sharing groups of the users whose update vectors are given (row u: user u).

    k: the number of groups (1..users), or None to choose it by ``rule`` among 1..max_k
    ('eigengap', the default) or 2..max_k ('silhouette', FedLEASE's rule); max_k: None = users - 1.
    A tie between numbers of groups goes to the smaller. One user, or two under 'eigengap', always
    gives one group; fix k to split two users."""
    m = _as_matrix(vectors)
    n = m.shape[0]
    if n == 0:
        raise ValueError("no update vectors: at least one user is needed to form groups")
    if rule not in RULES:
        raise ValueError(f"rule ({rule!r}) must be one of {', '.join(RULES)}")
    if max_k is not None and max_k < 1:
        raise ValueError(f"max_k ({max_k}) must be >= 1")
    similarity = compute_cosine_similarity(m, blocks)
    distance = 1.0 - similarity
    np.fill_diagonal(distance, 0.0)
    if k is not None:
        if not 1 <= k <= n:
            raise ValueError(f"the number of groups ({k}) must be between 1 and the number of users ({n})")
        return LearnedGroups(compute_average_linkage(distance, k), "given", {}, similarity)
    cap = n - 1 if max_k is None else min(max_k, n - 1)
    if rule == "eigengap":
        scores = compute_eigengap_scores(similarity, cap) if n > 1 else {}
        candidates = {c: compute_average_linkage(distance, c) for c in scores}
    else:
        candidates = {c: compute_average_linkage(distance, c) for c in range(2, cap + 1)}
        scores = {c: compute_silhouette(distance, g) for c, g in candidates.items()}
    if not scores:
        return LearnedGroups([list(range(n))], rule, scores, similarity)
    best = max(scores, key=lambda c: (round(scores[c], _DIGITS), -c))
    return LearnedGroups(candidates[best], rule, scores, similarity)
