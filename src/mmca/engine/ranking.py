"""Ranks of the true matches and top-K search under the full score S, three ways:

- "exhaustive": every pair through the cross unit (streamed by image block);
- "exact": the bound i0·c0 - α <= S <= i0·c0 + α decides most pairs; the cross unit runs only
  on the pairs it cannot decide, each pair once for both directions. With `max_rank`, each
  query's undecided candidates are scored in bound order and the query stops as soon as its
  rank is known to be >= max_rank. Same ranks as "exhaustive", bit for bit;
- "shortlist": the cross unit on the top `shortlist_k` of i0·c0 only (approximate; items off
  the shortlist rank below it, ordered by i0·c0).

Ranks follow the convention of `mmca.metrics` (0-based; `ties` says how a candidate scoring
exactly as the true item counts: "pessimistic" against it, "argsort" by the field's sort
order), whose `retrieval_metrics(result.i2t, result.t2i, result.exact_below)` turns them
into R@K, rsum, medr and meanr.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from mmca.dist import Shard
from mmca.engine.guards import full_fp32, require_finite
from mmca.metrics import TIES, ahead


@dataclass
class RankResult:
    i2t: np.ndarray  # (N,) int64
    t2i: np.ndarray  # (M,) int64
    pair_passes: int
    exact_below: int | None  # ranks < this are exact; None: all exact (or mode is shortlist)
    mode: str
    ties: str = "pessimistic"


@dataclass
class _Truth:
    """What each query's true item scores, and its index (the tie-break of ties="argsort"):
    t2i: caption j's true image gimg[j] scores tau[j]; i2t: image i's best own caption (the
    one first in the sort order) is sidx[i], scoring sigma[i]."""

    gimg: torch.Tensor
    tau: torch.Tensor
    sigma: torch.Tensor
    sidx: torch.Tensor
    ties: str

    def t2i_ahead(self, score, image, caption):  # image, caption: indices broadcast with score
        return ahead(score, image, self.tau[caption], self.gimg[caption], self.ties)

    def i2t_ahead(self, score, image, caption):
        return ahead(score, caption, self.sigma[image], self.sidx[image], self.ties)


def _thresholds(engine, images, texts, gimg, ties: str = "pessimistic", shard: Shard = Shard()) -> _Truth:
    """tau_j = S(g(j), j); sigma_i = max over the captions of image i of S(i, c), and the
    caption reaching it that sorts first (the highest index under ties="argsort"). Each rank
    scores its span of the true pairs; every rank gets all of them."""
    m, dev = len(texts), engine.device
    caps = torch.arange(m, device=dev)
    cs, ce = shard.span(m)
    tau = shard.join(engine.pair_scores(images, texts, gimg[cs:ce], caps[cs:ce]), m)
    sigma = torch.full((len(images),), float("-inf"), device=dev)
    sigma.scatter_reduce_(0, gimg, tau, reduce="amax", include_self=True)
    best = tau == sigma[gimg]
    sidx = torch.full((len(images),), -1, dtype=torch.int64, device=dev)
    sidx.scatter_reduce_(0, gimg[best], caps[best], reduce="amax", include_self=True)
    return _Truth(gimg, tau, sigma, sidx, ties)


def ranks(engine, images, texts, caption_image, mode: str = "exact", max_rank: int | None = None,
          shortlist_k: int = 100, image_block: int = 256, ties: str = "pessimistic",
          shard: Shard = Shard()) -> RankResult:
    """Ranks of every query. With a `shard` of several ranks, each rank works on its share of
    the queries (image rows; in the capped mode also caption columns) and the ranks and pair
    passes are combined: every rank returns the single-process result, bit for bit (a pair's
    score is the same float whichever rank computes it)."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(TIES)}, not {ties!r}")
    start = engine.pair_passes
    gimg = torch.as_tensor(np.asarray(caption_image, dtype=np.int64), device=engine.device)
    if len(gimg) != len(texts):
        raise ValueError("caption_image needs one image index per caption of the text bank")
    require_finite(images.i0, "image embeddings i0", "image")
    require_finite(texts.c0, "caption embeddings c0", "caption")
    with full_fp32():
        if mode == "exhaustive":
            i2t, t2i = _exhaustive(engine, images, texts, gimg, image_block, ties, shard)
        elif mode == "exact":
            if max_rank is None:
                i2t, t2i = _exact_all(engine, images, texts, gimg, image_block, ties, shard)
            else:
                i2t, t2i = _exact_capped(engine, images, texts, gimg, int(max_rank), ties, shard)
        elif mode == "shortlist":
            i2t, t2i = _shortlist(engine, images, texts, gimg, int(shortlist_k), image_block, ties, shard)
        else:
            raise ValueError(f"mode must be 'exact', 'exhaustive' or 'shortlist', not {mode!r}")
    if max_rank is not None and mode != "shortlist":
        i2t, t2i = i2t.clamp(max=max_rank), t2i.clamp(max=max_rank)
    return RankResult(i2t.cpu().numpy(), t2i.cpu().numpy(), shard.total(engine.pair_passes - start),
                      max_rank if mode != "shortlist" else None, mode, ties)


def _exhaustive(engine, images, texts, gimg, image_block, ties, shard):
    truth = _thresholds(engine, images, texts, gimg, ties, shard)
    t2i = torch.zeros(len(texts), dtype=torch.int64, device=engine.device)
    i2t = torch.zeros(len(images), dtype=torch.int64, device=engine.device)
    caps = torch.arange(len(texts), device=engine.device)[None, :]
    first, last = shard.span(len(images))
    # the true pairs were scored for the thresholds: the blocks reuse them (N x M passes in all)
    blocks = engine.iter_full_scores(images, texts, min(image_block, 64), known=(gimg, truth.tau),
                                     images_span=(first, last))
    for s, e, block in blocks:
        rows = torch.arange(s, e, device=engine.device)[:, None]
        neg = gimg[None, :] != rows
        t2i += (truth.t2i_ahead(block, rows, caps) & neg).sum(0)
        i2t[s:e] = (truth.i2t_ahead(block, rows, caps) & neg).sum(1)
    return shard.sum(i2t), shard.sum(t2i)


def _spans(n: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + block)) for s in range(0, n, max(1, block))]


def _tiles(engine, n: int, m: int):
    """The tiles of the pair matrix that the exact passes hold at once: image spans of at most
    `pair_budget / M` images (an image tile times all captions holds ~pair_budget pairs) and
    caption spans of at most `pair_budget / N` captions. Candidate lists, masks and index
    vectors scale with the budget, not with the gallery."""
    budget = engine.pair_budget
    return _spans(n, max(1, budget // max(m, 1))), _spans(m, max(1, budget // max(n, 1)))


def _bounds(engine, images, texts, truth: _Truth, s, e, cs: int = 0, ce: int | None = None):
    """For images s:e and captions cs:ce: i0·c0 and the pairs the bound decides as sure hits or
    leaves undecided, in both directions. A pair's decision depends on the floats of g, which
    depend on the product's shapes: passes that must agree on it use the same tiles."""
    ce = len(texts) if ce is None else ce
    g = images.i0[s:e] @ texts.c0[cs:ce].T
    neg = truth.gimg[None, cs:ce] != torch.arange(s, e, device=engine.device)[:, None]
    lo, hi = g - engine.slack, g + engine.slack
    # a sure hit ranks ahead whatever the tie-break: S >= lo, and lo > threshold (or == when
    # ties count against the true item)
    sure = torch.ge if truth.ties == "pessimistic" else torch.gt
    t = truth.tau[None, cs:ce]
    sure_t = neg & sure(lo, t)
    maybe_t = neg & (hi >= t) & ~sure_t
    sig = truth.sigma[s:e, None]
    sure_i = neg & sure(lo, sig)
    maybe_i = neg & (hi >= sig) & ~sure_i
    return g, sure_t, maybe_t, sure_i, maybe_i


def _last(steps, first):
    """What an iterator yields last (`first` if it yields nothing), run to its end one step at a time."""
    tail = deque(steps, maxlen=1)
    return tail[0] if tail else first


def _exact_all(engine, images, texts, gimg, image_block, ties, shard):
    """Every undecided pair scored once, shared by both directions; streamed by image block."""
    i2t, t2i, _ = _last(exact_blocks(engine, images, texts, gimg, image_block, ties, shard), (None, None, None))
    return shard.sum(i2t), shard.sum(t2i)


def exact_blocks(engine, images, texts, gimg, image_block: int = 256, ties: str = "pessimistic",
                 shard: Shard = Shard()):
    """The exact pruned pass of mode "exact" (no max_rank), one image block at a time (at most
    `engine.pair_budget` pairs): yields (i2t, t2i, images done) once the thresholds are known
    (0 images done) and after each image block; the ranks are complete after the last one
    (the memory benchmark runs a time-limited prefix of it). With a shard: this rank's image
    rows only (the counts are this rank's part, to be summed over ranks)."""
    n, m = len(images), len(texts)
    truth = _thresholds(engine, images, texts, gimg, ties, shard)
    t2i = torch.zeros(m, dtype=torch.int64, device=engine.device)
    i2t = torch.zeros(n, dtype=torch.int64, device=engine.device)
    yield i2t, t2i, 0
    first, last = shard.span(n)
    for s, e in _spans(last - first, min(image_block, max(1, engine.pair_budget // max(m, 1)))):
        s, e = s + first, e + first
        _, sure_t, maybe_t, sure_i, maybe_i = _bounds(engine, images, texts, truth, s, e)
        t2i += sure_t.sum(0)
        i2t[s:e] += sure_i.sum(1)
        ii, jj = (maybe_t | maybe_i).nonzero(as_tuple=True)
        del sure_t, sure_i
        if len(ii):
            score = engine.pair_scores(images, texts, ii + s, jj)
            t2i.index_add_(0, jj, (maybe_t[ii, jj] & truth.t2i_ahead(score, ii + s, jj)).long())
            i2t.index_add_(0, ii + s, (maybe_i[ii, jj] & truth.i2t_ahead(score, ii + s, jj)).long())
        yield i2t, t2i, e


class _PairCache:
    """Scores already computed, keyed by i * M + j, so both directions share them. Kept as a
    few sorted runs of geometrically decreasing size (merged like a binary counter), so adding
    k scores costs O(k log K) rather than re-sorting all K. At most `limit` scores are kept
    (the oldest runs go first): a dropped score is recomputed if asked again, to the same float,
    since every block has the same shape."""

    def __init__(self, m: int, limit: int):
        self.m, self.limit = m, limit
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.runs)

    def get(self, engine, images, texts, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        key = i.astype(np.int64) * self.m + j
        out = np.empty(len(key), dtype=np.float32)
        found = np.zeros(len(key), dtype=bool)
        for keys, vals in self.runs:
            pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
            hit = ~found & (keys[pos] == key)
            out[hit] = vals[pos[hit]]
            found |= hit
        missing, inverse = np.unique(key[~found], return_inverse=True)
        if len(missing):
            sc = engine.pair_scores(images, texts, missing // self.m, missing % self.m).cpu().numpy()
            out[~found] = sc[inverse]
            self._add(missing, sc)
        return out

    def _add(self, keys: np.ndarray, vals: np.ndarray) -> None:
        self.runs.append((keys, vals))  # np.unique sorted them
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (k1, v1), (k2, v2) = self.runs.pop(), self.runs.pop()
            k, v = np.concatenate([k2, k1]), np.concatenate([v2, v1])
            order = np.argsort(k, kind="stable")
            self.runs.append((k[order], v[order]))
        while len(self) > self.limit:
            self.runs.pop(0)


def _ragged(starts: np.ndarray, counts: np.ndarray):
    """Row ids and flat positions start[r] + 0..count[r]-1 for every row r."""
    rows = np.repeat(np.arange(len(counts)), counts)
    offs = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, np.repeat(starts, counts) + offs


def _exact_capped(engine, images, texts, gimg, max_rank, ties, shard):
    rounds = capped_rounds(engine, images, texts, gimg, max_rank, ties, shard)
    i2t, t2i = next(rounds)  # after pass 1: the sure hits, the same on every rank
    sure_i, sure_t = i2t.copy(), t2i.copy()
    i2t, t2i = _last(rounds, (i2t, t2i))
    # each query's hits grew on its own rank only
    as_t = lambda a: torch.as_tensor(a, device=engine.device)  # noqa: E731
    return (as_t(sure_i) + shard.sum(as_t(i2t - sure_i)), as_t(sure_t) + shard.sum(as_t(t2i - sure_t)))


class _Queries:
    """The open queries of one tile (caption span for t2i, image span for i2t): each one's
    undecided candidates in bound order (highest i0·c0 first, then index), a cursor into them,
    its hit count (a view into the direction's global counts), and its true item's score and
    index (`thr`, `thr_idx`)."""

    def __init__(self, first: int, hits: np.ndarray, thr: np.ndarray, thr_idx: np.ndarray, ties: str, q, c, g):
        self.first, self.hits, self.thr, self.thr_idx, self.ties = first, hits, thr, thr_idx, ties
        q = np.concatenate(q) - first if q else np.zeros(0, np.int64)
        c = np.concatenate(c) if c else np.zeros(0, np.int64)
        g = np.concatenate(g) if g else np.zeros(0, np.float32)
        order = np.lexsort((c, -g, q))
        self.cand = c[order]
        self.count = np.bincount(q, minlength=len(hits))
        self.start = np.cumsum(self.count) - self.count
        self.cur = np.zeros(len(hits), np.int64)

    def next(self, max_rank: int, chunk: int):
        """-> (query (global), candidate) of the next `chunk` candidates of every query still
        open (fewer than max_rank hits) and not exhausted; advances the cursors."""
        act = np.nonzero((self.hits < max_rank) & (self.cur < self.count))[0]
        take = np.minimum(chunk, self.count[act] - self.cur[act])
        rows, pos = _ragged(self.start[act] + self.cur[act], take)
        self.cur[act] += take
        return act[rows] + self.first, self.cand[pos]

    def score(self, q: np.ndarray, c: np.ndarray, s: np.ndarray) -> None:
        local = q - self.first
        hit = ahead(s, c, self.thr[local], self.thr_idx[local], self.ties)
        self.hits += np.bincount(local[hit], minlength=len(self.hits))


def capped_rounds(engine, images, texts, gimg, max_rank: int, ties: str = "pessimistic",
                  shard: Shard = Shard()):
    """Mode "exact" with max_rank: ranks exact below max_rank. Pass 1 counts the sure hits of
    every query (i0·c0 only); then, tile by tile (a caption span for t2i alongside an image span
    for i2t, each at most `engine.pair_budget` candidate pairs), each query still open scores
    its undecided candidates in bound order, `chunk` at a time (doubling), until it has
    max_rank hits or none left. Yields (i2t, t2i) (numpy, views of the running counts) after
    pass 1 and after every scoring round; complete after the last. With a shard, this rank
    scores only the queries of its caption span (t2i) and image span (i2t)."""
    n, m = len(images), len(texts)
    truth = _thresholds(engine, images, texts, gimg, ties, shard)
    img_tiles, cap_tiles = _tiles(engine, n, m)
    tiles = [(i, c) for i in img_tiles for c in cap_tiles]
    sure_t = torch.zeros(m, dtype=torch.int64, device=engine.device)
    sure_i = torch.zeros(n, dtype=torch.int64, device=engine.device)
    for (s, e), (cs, ce) in tiles:  # pass 1: sure hits (cheap: i0·c0 only)
        _, st, _, si, _ = _bounds(engine, images, texts, truth, s, e, cs, ce)
        sure_t[cs:ce] += st.sum(0)
        sure_i[s:e] += si.sum(1)
    open_t, open_i = sure_t < max_rank, sure_i < max_rank
    if shard.world > 1:  # the other ranks' queries are theirs to score
        (cs, ce), (s, e) = shard.span(m), shard.span(n)
        open_t[:cs], open_t[ce:], open_i[:s], open_i[e:] = False, False, False, False
    hits_t, hits_i = sure_t.cpu().numpy().copy(), sure_i.cpu().numpy().copy()
    tau_np, sigma_np = truth.tau.cpu().numpy(), truth.sigma.cpu().numpy()
    gimg_np, sidx_np = truth.gimg.cpu().numpy(), truth.sidx.cpu().numpy()
    yield hits_i, hits_t
    cache = _PairCache(m, engine.pair_budget)
    for k in range(max(len(img_tiles), len(cap_tiles))):
        # the undecided candidates of the open queries of caption span k and image span k
        qt, ct, gt, qi, ci, gi = [], [], [], [], [], []
        cspan = cap_tiles[k] if k < len(cap_tiles) else (m, m)
        ispan = img_tiles[k] if k < len(img_tiles) else (n, n)
        for (s, e), (cs, ce) in tiles:
            t_here = cspan[0] <= cs < cspan[1]
            i_here = ispan[0] <= s < ispan[1]
            if not (t_here or i_here):
                continue
            g, _, mt, _, mi = _bounds(engine, images, texts, truth, s, e, cs, ce)
            for here, mask, open_, qs, cs_, gs, t_dir in ((t_here, mt, open_t[None, cs:ce], qt, ct, gt, True),
                                                          (i_here, mi, open_i[s:e, None], qi, ci, gi, False)):
                if not here:
                    continue
                ii, jj = (mask & open_).nonzero(as_tuple=True)
                qs.append((jj + cs if t_dir else ii + s).cpu().numpy())
                cs_.append((ii + s if t_dir else jj + cs).cpu().numpy())
                gs.append(g[ii, jj].cpu().numpy())
            del g, mt, mi
        tq = _Queries(cspan[0], hits_t[cspan[0]:cspan[1]], tau_np[cspan[0]:cspan[1]],
                      gimg_np[cspan[0]:cspan[1]], ties, qt, ct, gt)
        iq = _Queries(ispan[0], hits_i[ispan[0]:ispan[1]], sigma_np[ispan[0]:ispan[1]],
                      sidx_np[ispan[0]:ispan[1]], ties, qi, ci, gi)
        del qt, ct, gt, qi, ci, gi
        chunk = 8
        while True:
            cap_q, img_c = tq.next(max_rank, chunk)
            img_q, cap_c = iq.next(max_rank, chunk)
            if not len(cap_q) and not len(img_q):
                break
            sc = cache.get(engine, images, texts, np.concatenate([img_c, img_q]),
                           np.concatenate([cap_q, cap_c]))
            tq.score(cap_q, img_c, sc[:len(cap_q)])
            iq.score(img_q, cap_c, sc[len(cap_q):])
            chunk *= 2
            yield hits_i, hits_t


def _shortlist(engine, images, texts, gimg, k, image_block, ties, shard):
    n, m = len(images), len(texts)
    dev = engine.device
    empty = torch.zeros(0, dtype=torch.int64, device=dev)

    def spans(count):  # this rank's query blocks
        first, last = shard.span(count)
        return [(s + first, e + first) for s, e in _spans(last - first, image_block)]

    # t2i: per caption, the top-k images by i0·c0 (its one true image: gimg)
    t2i = torch.cat([empty] + [
        _shortlist_ranks(texts.c0[s:e] @ images.i0.T,
                         gimg[s:e, None] == torch.arange(n, device=dev)[None, :],
                         lambda q, c, s=s: engine.pair_scores(images, texts, c, q + s), k, ties)
        for s, e in spans(m)])
    # i2t: per image, the top-k captions by i0·c0 (its true captions: those with gimg == image)
    i2t = torch.cat([empty] + [
        _shortlist_ranks(images.i0[s:e] @ texts.c0.T,
                         gimg[None, :] == torch.arange(s, e, device=dev)[:, None],
                         lambda q, c, s=s: engine.pair_scores(images, texts, q + s, c), k, ties)
        for s, e in spans(n)])
    return shard.join(i2t, n), shard.join(t2i, m)


def _first_true(values, index, is_true, ties):
    """Per row, the true item that sorts first: (its value, its index). Under "argsort" ties
    the highest index among equal values sorts first; "pessimistic" needs only the value."""
    ninf = torch.tensor(float("-inf"), device=values.device)
    best = torch.where(is_true, values, ninf).amax(1)
    at_best = is_true & (values == best[:, None])
    idx = torch.where(at_best, index, torch.full_like(index, -1)).amax(1)
    return best, idx


def _shortlist_ranks(g, own, score, k, ties="pessimistic"):
    """Ranks of a block of queries against all candidates, the cross unit on each query's top
    `k` candidates by g = i0·c0 only: g (b, C) and own (b, C) (True on the query's true
    items); score(query rows, candidates) -> full S of those pairs. Within the shortlist: the
    negatives ranking ahead of the best true item under S; a query with no true item on its
    shortlist ranks below the whole shortlist, then by g against the best true item's g."""
    kk = min(k, g.shape[1])
    short = g.topk(kk, dim=1).indices  # (b, kk)
    rows = torch.arange(len(g), device=g.device)
    sc = score(rows.repeat_interleave(kk), short.reshape(-1)).view(-1, kk)
    is_true = own.gather(1, short)
    best, best_idx = _first_true(sc, short, is_true, ties)
    r_in = (ahead(sc, short, best[:, None], best_idx[:, None], ties) & ~is_true).sum(1)
    every = torch.arange(g.shape[1], device=g.device).expand_as(g)
    g_best, g_idx = _first_true(g, every, own, ties)
    off = torch.ones_like(own).scatter_(1, short, False) & ~own
    r_out = (~is_true).sum(1) + (ahead(g, every, g_best[:, None], g_idx[:, None], ties) & off).sum(1)
    return torch.where(is_true.any(1), r_in, r_out)


def topk(engine, images, texts, k: int, query: str = "text", mode: str = "exact",
         block: int = 256):
    """Per query (caption if query == "text", image if "image"), the k best items of the other
    side under full S -> (scores (Q, k), indices (Q, k)), sorted by score descending and, among
    equal scores, by index ascending. "exact" prunes with the bound; "exhaustive" scores all."""
    require_finite(images.i0, "image embeddings i0", "image")
    require_finite(texts.c0, "caption embeddings c0", "caption")
    with full_fp32():
        return _topk(engine, images, texts, k, query, mode, block)


def _topk(engine, images, texts, k, query, mode, block):
    by_text = query == "text"
    nq, nc = (len(texts), len(images)) if by_text else (len(images), len(texts))
    k = min(int(k), nc)
    dev = engine.device
    out_s = torch.empty(nq, k, device=dev)
    out_i = torch.empty(nq, k, dtype=torch.int64, device=dev)

    def score(q_idx, c_idx):
        if by_text:
            return engine.pair_scores(images, texts, c_idx, q_idx)
        return engine.pair_scores(images, texts, q_idx, c_idx)

    for s in range(0, nq, block):
        e = min(nq, s + block)
        b = e - s
        q = torch.arange(s, e, device=dev)
        g = (texts.c0[s:e] @ images.i0.T) if by_text else (images.i0[s:e] @ texts.c0.T)
        if mode == "exhaustive":
            full = score(q.repeat_interleave(nc), torch.arange(nc, device=dev).repeat(b)).view(b, nc)
            vals, order = torch.sort(full, dim=1, descending=True, stable=True)
            out_s[s:e], out_i[s:e] = vals[:, :k], order[:, :k]
            continue
        if mode != "exact":
            raise ValueError(f"mode must be 'exact' or 'exhaustive', not {mode!r}")
        gs, order = torch.sort(g, dim=1, descending=True, stable=True)
        ub = gs + engine.slack
        kth_lb = gs[:, k - 1] - engine.slack
        ncand = (ub >= kth_lb[:, None]).sum(1)  # a prefix, since gs is sorted
        computed = torch.full((b, nc), float("-inf"), device=dev)
        cursor = torch.zeros(b, dtype=torch.int64, device=dev)
        active = torch.ones(b, dtype=torch.bool, device=dev)
        chunk = max(k, 8)
        while bool(active.any()):
            rows = active.nonzero().squeeze(1)
            take = torch.minimum(torch.full_like(cursor[rows], chunk), ncand[rows] - cursor[rows])
            r = torch.repeat_interleave(rows, take)
            offs = torch.arange(int(take.sum()), device=dev) - torch.repeat_interleave(
                torch.cumsum(take, 0) - take, take)
            pos = cursor[r] + offs
            computed[r, pos] = score(q[r], order[r, pos])
            cursor[rows] += take
            kth = computed.topk(k, dim=1).values[:, k - 1]
            nxt = ub.gather(1, cursor.clamp(max=nc - 1)[:, None]).squeeze(1)
            done = (cursor >= ncand) | ((cursor >= k) & (kth > nxt))
            active &= ~done
            chunk *= 2
        # among the computed candidates: score descending, then index ascending
        by_index = torch.argsort(order, dim=1)
        vals_by_index = computed.gather(1, by_index)
        vals, pos = torch.sort(vals_by_index, dim=1, descending=True, stable=True)
        out_s[s:e], out_i[s:e] = vals[:, :k], pos[:, :k]
    return out_s, out_i
