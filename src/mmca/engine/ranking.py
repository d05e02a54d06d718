"""Ranks of the true matches and top-K search under the full score S, three ways:

- "exhaustive": every pair through the cross unit (streamed by image block);
- "exact": the bound i0·c0 - α <= S <= i0·c0 + α decides most pairs; the cross unit runs only
  on the pairs it cannot decide, each pair once for both directions. With `max_rank`, each
  query's undecided candidates are scored in bound order and the query stops as soon as its
  rank is known to be >= max_rank. Same ranks as "exhaustive", bit for bit;
- "shortlist": the cross unit on the top `shortlist_k` of i0·c0 only (approximate; items off
  the shortlist rank below it, ordered by i0·c0).

Ranks follow the convention of `mmca.metrics` (0-based, ties count against the true item),
whose `retrieval_metrics(result.i2t, result.t2i, result.exact_below)` turns them into
R@K, rsum, medr and meanr.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RankResult:
    i2t: np.ndarray  # (N,) int64
    t2i: np.ndarray  # (M,) int64
    pair_passes: int
    exact_below: int | None  # ranks < this are exact; None: all exact (or mode is shortlist)
    mode: str


def _thresholds(engine, images, texts, gimg):
    """tau_j = S(g(j), j); sigma_i = max over the captions of image i of S(i, c)."""
    m = len(texts)
    tau = engine.pair_scores(images, texts, gimg, torch.arange(m, device=engine.device))
    sigma = torch.full((len(images),), float("-inf"), device=engine.device)
    sigma.scatter_reduce_(0, gimg, tau, reduce="amax", include_self=True)
    return tau, sigma


def ranks(engine, images, texts, caption_image, mode: str = "exact", max_rank: int | None = None,
          shortlist_k: int = 100, image_block: int = 256) -> RankResult:
    start = engine.pair_passes
    gimg = torch.as_tensor(np.asarray(caption_image, dtype=np.int64), device=engine.device)
    if len(gimg) != len(texts):
        raise ValueError("caption_image needs one image index per caption of the text bank")
    if mode == "exhaustive":
        i2t, t2i = _exhaustive(engine, images, texts, gimg, image_block)
    elif mode == "exact":
        if max_rank is None:
            i2t, t2i = _exact_all(engine, images, texts, gimg, image_block)
        else:
            i2t, t2i = _exact_capped(engine, images, texts, gimg, int(max_rank), image_block)
    elif mode == "shortlist":
        i2t, t2i = _shortlist(engine, images, texts, gimg, int(shortlist_k), image_block)
    else:
        raise ValueError(f"mode must be 'exact', 'exhaustive' or 'shortlist', not {mode!r}")
    if max_rank is not None and mode != "shortlist":
        i2t, t2i = i2t.clamp(max=max_rank), t2i.clamp(max=max_rank)
    return RankResult(i2t.cpu().numpy(), t2i.cpu().numpy(), engine.pair_passes - start,
                      max_rank if mode != "shortlist" else None, mode)


def _exhaustive(engine, images, texts, gimg, image_block):
    tau, sigma = _thresholds(engine, images, texts, gimg)
    t2i = torch.zeros(len(texts), dtype=torch.int64, device=engine.device)
    i2t = torch.zeros(len(images), dtype=torch.int64, device=engine.device)
    for s, e, block in engine.iter_full_scores(images, texts, min(image_block, 64)):
        neg = gimg[None, :] != torch.arange(s, e, device=engine.device)[:, None]
        t2i += ((block >= tau[None, :]) & neg).sum(0)
        i2t[s:e] = ((block >= sigma[s:e, None]) & neg).sum(1)
    return i2t, t2i


def _bounds(engine, images, texts, gimg, s, e, tau, sigma):
    """For images s:e: sure hits and undecided pairs in both directions."""
    g = images.i0[s:e] @ texts.c0.T
    neg = gimg[None, :] != torch.arange(s, e, device=engine.device)[:, None]
    lo, hi = g - engine.slack, g + engine.slack
    sure_t = neg & (lo >= tau[None, :])
    maybe_t = neg & (hi >= tau[None, :]) & ~sure_t
    sig = sigma[s:e, None]
    sure_i = neg & (lo >= sig)
    maybe_i = neg & (hi >= sig) & ~sure_i
    return g, sure_t, maybe_t, sure_i, maybe_i


def _exact_all(engine, images, texts, gimg, image_block):
    """Every undecided pair scored once, shared by both directions; streamed by image block."""
    i2t, t2i = None, None
    for i2t, t2i, _ in exact_blocks(engine, images, texts, gimg, image_block):
        pass
    return i2t, t2i


def exact_blocks(engine, images, texts, gimg, image_block: int = 256):
    """The exact pruned pass of mode "exact" (no max_rank), one image block at a time: yields
    (i2t, t2i, images done) once the thresholds are known (0 images done) and after each
    image block; the ranks are complete after the last one (the memory benchmark runs a
    time-limited prefix of it)."""
    tau, sigma = _thresholds(engine, images, texts, gimg)
    t2i = torch.zeros(len(texts), dtype=torch.int64, device=engine.device)
    i2t = torch.zeros(len(images), dtype=torch.int64, device=engine.device)
    yield i2t, t2i, 0
    for s in range(0, len(images), image_block):
        e = min(len(images), s + image_block)
        _, sure_t, maybe_t, sure_i, maybe_i = _bounds(engine, images, texts, gimg, s, e, tau, sigma)
        t2i += sure_t.sum(0)
        i2t[s:e] += sure_i.sum(1)
        ii, jj = (maybe_t | maybe_i).nonzero(as_tuple=True)
        if len(ii):
            score = engine.pair_scores(images, texts, ii + s, jj)
            t2i.index_add_(0, jj, (maybe_t[ii, jj] & (score >= tau[jj])).long())
            i2t.index_add_(0, ii + s, (maybe_i[ii, jj] & (score >= sigma[ii + s])).long())
        yield i2t, t2i, e


class _PairCache:
    """Scores already computed, keyed by i * M + j, so both directions share them."""

    def __init__(self, m: int):
        self.m = m
        self.keys = np.zeros(0, dtype=np.int64)
        self.vals = np.zeros(0, dtype=np.float32)

    def get(self, engine, images, texts, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        key = i.astype(np.int64) * self.m + j
        pos = np.searchsorted(self.keys, key)
        pos_c = np.minimum(pos, max(len(self.keys) - 1, 0))
        found = (pos < len(self.keys)) & (self.keys[pos_c] == key) if len(self.keys) else np.zeros(len(key), bool)
        out = np.empty(len(key), dtype=np.float32)
        out[found] = self.vals[pos_c[found]]
        missing = np.unique(key[~found])
        if len(missing):
            sc = engine.pair_scores(images, texts, missing // self.m, missing % self.m).cpu().numpy()
            keys = np.concatenate([self.keys, missing])
            vals = np.concatenate([self.vals, sc])
            order = np.argsort(keys, kind="stable")
            self.keys, self.vals = keys[order], vals[order]
            pos = np.searchsorted(self.keys, key[~found])
            out[~found] = self.vals[pos]
        return out


def _ragged(starts: np.ndarray, counts: np.ndarray):
    """Row ids and flat positions start[r] + 0..count[r]-1 for every row r."""
    rows = np.repeat(np.arange(len(counts)), counts)
    offs = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, np.repeat(starts, counts) + offs


def _exact_capped(engine, images, texts, gimg, max_rank, image_block):
    """Ranks exact below max_rank: sure hits first, then each unsettled query's undecided
    candidates in bound order (highest i0·c0 first), stopping once rank >= max_rank."""
    n, m = len(images), len(texts)
    tau, sigma = _thresholds(engine, images, texts, gimg)
    sure_t = torch.zeros(m, dtype=torch.int64, device=engine.device)
    sure_i = torch.zeros(n, dtype=torch.int64, device=engine.device)
    for s in range(0, n, image_block):  # pass 1: sure hits (cheap: i0·c0 only)
        e = min(n, s + image_block)
        _, st, _, si, _ = _bounds(engine, images, texts, gimg, s, e, tau, sigma)
        sure_t += st.sum(0)
        sure_i[s:e] += si.sum(1)
    open_t, open_i = sure_t < max_rank, sure_i < max_rank
    cand_t, cand_i = [], []  # (query, candidate, g) of undecided pairs of open queries
    for s in range(0, n, image_block):  # pass 2: the undecided candidates of open queries
        e = min(n, s + image_block)
        g, _, mt, _, mi = _bounds(engine, images, texts, gimg, s, e, tau, sigma)
        mt &= open_t[None, :]
        mi &= open_i[s:e, None]
        ii, jj = mt.nonzero(as_tuple=True)
        cand_t.append(torch.stack([jj, ii + s]).cpu().numpy())
        cand_t.append(g[ii, jj].cpu().numpy()[None])
        ii, jj = mi.nonzero(as_tuple=True)
        cand_i.append(torch.stack([ii + s, jj]).cpu().numpy())
        cand_i.append(g[ii, jj].cpu().numpy()[None])

    def lists(parts, nq):
        q = np.concatenate([p[0] for p in parts[0::2]]) if parts else np.zeros(0, np.int64)
        c = np.concatenate([p[1] for p in parts[0::2]]) if parts else np.zeros(0, np.int64)
        g = np.concatenate([p[0] for p in parts[1::2]]) if parts else np.zeros(0, np.float32)
        order = np.lexsort((c, -g, q))  # per query: bound order, then index
        q, c = q[order], c[order]
        counts = np.bincount(q, minlength=nq)
        return c, np.cumsum(counts) - counts, counts

    tc, t_start, t_len = lists(cand_t, m)
    ic, i_start, i_len = lists(cand_i, n)
    tau_np, sigma_np = tau.cpu().numpy(), sigma.cpu().numpy()
    hits_t, hits_i = sure_t.cpu().numpy().copy(), sure_i.cpu().numpy().copy()
    cur_t, cur_i = np.zeros(m, np.int64), np.zeros(n, np.int64)
    cache = _PairCache(m)
    chunk = 8
    while True:
        act_t = np.nonzero((hits_t < max_rank) & (cur_t < t_len))[0]
        act_i = np.nonzero((hits_i < max_rank) & (cur_i < i_len))[0]
        if not len(act_t) and not len(act_i):
            break
        take_t = np.minimum(chunk, t_len[act_t] - cur_t[act_t])
        take_i = np.minimum(chunk, i_len[act_i] - cur_i[act_i])
        rt, pt = _ragged(t_start[act_t] + cur_t[act_t], take_t)
        ri, pi = _ragged(i_start[act_i] + cur_i[act_i], take_i)
        qt, qi = act_t[rt], act_i[ri]
        img = np.concatenate([tc[pt], qi])
        cap = np.concatenate([qt, ic[pi]])
        sc = cache.get(engine, images, texts, img, cap)
        st, si = sc[:len(pt)], sc[len(pt):]
        hits_t += np.bincount(qt[st >= tau_np[qt]], minlength=m)
        hits_i += np.bincount(qi[si >= sigma_np[qi]], minlength=n)
        cur_t[act_t] += take_t
        cur_i[act_i] += take_i
        chunk *= 2
    dev = engine.device
    return torch.as_tensor(hits_i, device=dev), torch.as_tensor(hits_t, device=dev)


def _shortlist(engine, images, texts, gimg, k, image_block):
    n, m = len(images), len(texts)
    dev = engine.device
    # t2i: per caption, the top-k images by i0·c0 (its one true image: gimg)
    t2i = torch.cat([
        _shortlist_ranks(texts.c0[s:e] @ images.i0.T,
                         gimg[s:e, None] == torch.arange(n, device=dev)[None, :],
                         lambda q, c, s=s: engine.pair_scores(images, texts, c, q + s), k)
        for s, e in _spans(m, image_block)]) if m else torch.zeros(0, dtype=torch.int64, device=dev)
    # i2t: per image, the top-k captions by i0·c0 (its true captions: those with gimg == image)
    i2t = torch.cat([
        _shortlist_ranks(images.i0[s:e] @ texts.c0.T,
                         gimg[None, :] == torch.arange(s, e, device=dev)[:, None],
                         lambda q, c, s=s: engine.pair_scores(images, texts, q + s, c), k)
        for s, e in _spans(n, image_block)]) if n else torch.zeros(0, dtype=torch.int64, device=dev)
    return i2t, t2i


def _spans(n: int, block: int):
    return [(s, min(n, s + block)) for s in range(0, n, block)]


def _shortlist_ranks(g, own, score, k):
    """Ranks of a block of queries against all candidates, the cross unit on each query's top
    `k` candidates by g = i0·c0 only: g (b, C) and own (b, C) (True on the query's true
    items); score(query rows, candidates) -> full S of those pairs. Within the shortlist: the
    negatives with S >= the best true item's S; a query with no true item on its shortlist
    ranks below the whole shortlist, then by g against the best true item's g."""
    kk = min(k, g.shape[1])
    short = g.topk(kk, dim=1).indices  # (b, kk)
    rows = torch.arange(len(g), device=g.device)
    sc = score(rows.repeat_interleave(kk), short.reshape(-1)).view(-1, kk)
    ninf = torch.tensor(float("-inf"), device=g.device)
    is_true = own.gather(1, short)
    best = torch.where(is_true, sc, ninf).amax(1)
    r_in = ((sc >= best[:, None]) & ~is_true).sum(1)
    g_best = torch.where(own, g, ninf).amax(1)
    off = torch.ones_like(own).scatter_(1, short, False) & ~own
    r_out = (~is_true).sum(1) + ((g >= g_best[:, None]) & off).sum(1)
    return torch.where(is_true.any(1), r_in, r_out)


def topk(engine, images, texts, k: int, query: str = "text", mode: str = "exact",
         block: int = 256):
    """Per query (caption if query == "text", image if "image"), the k best items of the other
    side under full S -> (scores (Q, k), indices (Q, k)), sorted by score descending and, among
    equal scores, by index ascending. "exact" prunes with the bound; "exhaustive" scores all."""
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
