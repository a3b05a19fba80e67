"""Probe: which verification reading can a tiny LM learn to decide from? Text only: the oracle's captions stand in for
what F reads from the pictures. It trains a 4-layer, 128-wide decoder (the demo F's text size) on the verification
items of 80% of the train queries and measures the other 20% (never val):
  - the decision from the oracle's reading (teacher-forced): accuracy at P(yes) 0.5 and agreement at 0.95;
  - the whole reading written by the model (greedy), then its decision (GENERATED; NGEN items).

Formats: A "Change: <picture 1 -> 2>. Asked: <the text's change>"; E the asked caption after Picture 2's, then
per-attribute checks; G (what sft.verify_summary writes) the asked caption before Picture 2's (which is given, as
F would read it), then the checks; F = A + checks; S = G with the asked garment as slots; R the staged rewrite's new text from the two captions.

  python -m recall_jax.main --config configs/demo.py --workdir /tmp/probe_wd --config.stages=prepare
  python probes/verify_reading.py --format G --steps 600 --workdir /tmp/probe_wd
Measured 2026-12-02 (2 cores, ~7 min a run): A 0.86 / 0.55 after 600 steps; G 1.00 / 1.00 after 200 steps and
0.71 generated after 600 (yes-rate 0.79 at 0.95); E 1.00 / 1.00, generated 0.72 (it copies Picture 2's caption).
Measured 2026-12-03: G with --cw 20 (each same/differs token weighted 20) 1.00 / 1.00, generated 0.65 (yes-rate
0.77, reading exact 0.47): the checks are not the bottleneck; writing the asked caption from Picture 1 and the text is.
Measured 2026-12-03: S (G with the asked garment as attribute slots, what sft.verify_turn_answers writes) 1.00 /
1.00, reading-exact(tf) 0.91 after 600 steps; generated 0.937 at 0.95 (yes-rate 0.56, reading exact 0.93).
"""
import argparse, sys, time, json
import numpy as np
import jax, jax.numpy as jnp, optax

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from configs import demo
from recall_jax.stages import common
from recall_jax.generate import sft
from recall_jax.data import prompts
from recall_jax.data.synthetic.oracle import Oracle
from recall_jax.data.synthetic import oracle as oracle_lib, language

p = argparse.ArgumentParser()
p.add_argument("--format", default="A")
p.add_argument("--steps", type=int, default=1500)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--dw", type=float, default=20.0)
p.add_argument("--workdir", default="/tmp/probe_wd")
p.add_argument("--layers", type=int, default=4)
p.add_argument("--cw", type=float, default=1.0, help="loss weight of each check's same/differs token")
args = p.parse_args()

cfg = demo.get_config()
splits = common.read_splits(cfg, args.workdir, "train")
import glob
ckpt = glob.glob(f"{args.workdir}/prepare/**/tokenizer.json", recursive=True)[0].rsplit("/", 1)[0]
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(ckpt)

def change_text(oracle, first, second):
  """Format A's change first -> second in the canonical wording; "none" for the same garment."""
  a, b = oracle.garment(first), oracle.garment(second)
  return sft.canonical_edit(a, b) if a.diff(b) else "none"


def asked_text(oracle, reference, text):
  """Format A's change `text` asks of the reference in the canonical wording ("none" when it asks none)."""
  ref = oracle.garment(reference)
  wanted = oracle_lib.implied(ref, text)
  return sft.canonical_edit(ref, wanted) if ref.diff(wanted) else "none"


def reading(fmt, oracle, r, c, t):
  gr, gc = oracle.garment(r), oracle.garment(c)
  wanted = oracle_lib.implied(gr, t)
  if wanted is None or wanted.category != gr.category:
    return None
  yes = oracle.judge(r, t, c)
  c1, c2 = oracle.describe(r), oracle.describe(c)
  head = f"Picture 1: {c1}. Picture 2: {c2}."
  if fmt == "A":
    change = change_text(oracle, r, c)
    asked = asked_text(oracle, r, t)
    body = f" Change: {change}. Asked: {asked}."
    gen_spans = [body]
  elif fmt == "B":
    body = f" Asked: {language.describe_garment(wanted)}."
    gen_spans = [body]
  elif fmt == "E":  # asked caption, then per-attribute same/differs against picture 2
    checks = sft.attribute_checks(wanted, gc)
    body = f" Asked: {language.describe_garment(wanted)}. Check: {checks}."
    gen_spans = [body]
  elif fmt == "F":  # A, then per-attribute check of the asked change vs the picture change
    change = change_text(oracle, r, c)
    asked = asked_text(oracle, r, t)
    checks = sft.attribute_checks(wanted, gc)
    body = f" Change: {change}. Asked: {asked}. Check: {checks}."
    gen_spans = [body]
  elif fmt == "G":
    checks = sft.attribute_checks(wanted, gc)
    return (f"Text: {t}\nPicture 1: {c1}.", [(f" Asked: {language.describe_garment(wanted)}. Picture 2:", True),
            (f" {c2}.", False), (f" Check: {checks}. Answer:", True)], " yes" if yes else " no", yes)
  elif fmt == "S":  # G with the asked garment as attribute slots in CHECKED order, not a caption
    checks = sft.attribute_checks(wanted, gc)
    slots = ", ".join(f"{a} {wanted.get(a)}" for a in sft.ATTRIBUTES)
    return (f"Text: {t}\nPicture 1: {c1}.", [(f" Asked: {slots}. Picture 2:", True),
            (f" {c2}.", False), (f" Check: {checks}. Answer:", True)], " yes" if yes else " no", yes)
  elif fmt == "R":  # the staged rewrite's new text from the two captions
    if not gr.diff(gc):
      return None
    return f"Text: {t}\n{head}", [(f" New: {sft.canonical_edit(gr, gc)}. Answer:", True)], " yes", True
  else:
    raise ValueError(fmt)
  assert (wanted == gc) == yes
  return f"Text: {t}\n{head}", [(body + f" Answer:", True)], " yes" if yes else " no", yes


def items_for(oracle, queries, names):
  out = []
  for q in queries:
    text = prompts.join_captions(q.captions, cfg.data.caption_join)
    inst = sft.informative_instance(oracle, q, text, names)
    if inst is None:
      continue
    new = sft.closest_edit(oracle, q.reference, inst, text)
    canon = sft.canonical_edit(oracle.garment(q.reference), oracle.garment(inst))
    for c, t in [(q.target, text), (inst, text), (inst, new), (q.target, new), (inst, canon), (q.target, canon)]:
      rd = reading(args.format, oracle, q.reference, c, t)
      if rd is not None:
        out.append(rd)
  return out


train_items, test_items = [], []
for s in splits:
  oracle = Oracle(s.images)
  names = sorted({n for q in s.queries for n in (q.reference, *q.targets)})
  qs = [q for q in s.queries if q.target is not None]
  cut = int(0.8 * len(qs))
  train_items += items_for(oracle, qs[:cut], names)
  test_items += items_for(oracle, qs[cut:], names)
print(f"format {args.format}: train {len(train_items)} test {len(test_items)}; yes-rate "
      f"{np.mean([i[3] for i in train_items]):.2f}/{np.mean([i[3] for i in test_items]):.2f}")
print("example:", train_items[0])

L = 8 * -(-max(len(tok.encode(i[0] + ''.join(x for x, _ in i[1]) + i[2], add_special_tokens=False)) for i in train_items + test_items) // 8) + 8
print('L', L)


check_ids = {tok.encode(f" {word}", add_special_tokens=False)[0] for word in (sft.SAME, sft.DIFFERS)}


def encode(items):
  ids = np.zeros((len(items), L), np.int32)
  w = np.zeros((len(items), L), np.float32)
  dec_pos = np.zeros(len(items), np.int32)
  gen_mask = np.zeros((len(items), L), bool)
  for i, (ctx, segs, ans, yes) in enumerate(items):
    a = tok.encode(ctx, add_special_tokens=False)
    seq = list(a)
    for text, trained in segs:
      b = tok.encode(text, add_special_tokens=False)
      if trained:
        w[i, len(seq):len(seq) + len(b)] = [args.cw if t in check_ids else 1.0 for t in b]
        gen_mask[i, len(seq):len(seq) + len(b)] = True
      seq += b
    d = tok.encode(ans, add_special_tokens=False)
    assert len(d) == 1, (ans, d)
    seq += d
    assert len(seq) <= L, len(seq)
    ids[i, :len(seq)] = seq
    w[i, len(seq) - 1] = args.dw
    dec_pos[i] = len(seq) - 1
  return ids, w, dec_pos, gen_mask


tr, te = encode(train_items), encode(test_items)
yes_id = tok.encode(" yes", add_special_tokens=False)[0]
no_id = tok.encode(" no", add_special_tokens=False)[0]
print("max len", int((tr[0] > 0).sum(1).max()), int((te[0] > 0).sum(1).max()))

V, D, H, FF, NL = len(tok), 128, 4, 256, args.layers
key = jax.random.key(0)


def init(key):
  ks = iter(jax.random.split(key, 100))
  n = lambda *s: jax.random.normal(next(ks), s) * 0.02
  return {"emb": n(V, D), "layers": [{"ln1": jnp.ones(D), "qkv": n(D, 3 * D), "o": n(D, D), "ln2": jnp.ones(D),
                                       "up": n(D, 2 * FF), "down": n(FF, D)} for _ in range(NL)],
          "lnf": jnp.ones(D), "head": n(D, V)}


def rms(x, g):
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g


def rope(x):
  B, T, h, d = x.shape
  inv = 1.0 / (10000 ** (jnp.arange(0, d, 2) / d))
  ang = jnp.arange(T)[:, None] * inv[None]
  cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def forward(p, ids):
  x = p["emb"][ids]
  B, T = ids.shape
  mask = jnp.tril(jnp.ones((T, T), bool))
  for l in p["layers"]:
    h = rms(x, l["ln1"])
    q, k, v = jnp.split(h @ l["qkv"], 3, -1)
    q, k, v = (z.reshape(B, T, H, D // H) for z in (q, k, v))
    q, k = rope(q), rope(k)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H)
    s = jnp.where(mask, s, -1e9)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(B, T, D)
    x = x + a @ l["o"]
    h = rms(x, l["ln2"])
    g, u = jnp.split(h @ l["up"], 2, -1)
    x = x + (jax.nn.silu(g) * u) @ l["down"]
  return rms(x, p["lnf"]) @ p["head"]


def loss_fn(p, ids, w):
  logits = forward(p, ids)[:, :-1]
  tgt = ids[:, 1:]
  ww = w[:, 1:]
  lp = jax.nn.log_softmax(logits, -1)
  nll = -jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0]
  return (nll * ww).sum() / ww.sum()


opt = optax.adamw(optax.warmup_cosine_decay_schedule(0, args.lr, min(100, args.steps // 2), args.steps), weight_decay=0.0)
params = init(key)
state = opt.init(params)


@jax.jit
def step(p, s, ids, w):
  l, g = jax.value_and_grad(loss_fn)(p, ids, w)
  u, s = opt.update(g, s, p)
  return optax.apply_updates(p, u), s, l


@jax.jit
def evaluate(p, ids, dec_pos, gen_mask):
  logits = forward(p, ids)
  at = jnp.take_along_axis(logits, (dec_pos - 1)[:, None, None], 1)[:, 0]
  pyes = jax.nn.softmax(jnp.stack([at[:, no_id], at[:, yes_id]], -1), -1)[:, 1]
  pred = jnp.argmax(logits[:, :-1], -1) == ids[:, 1:]
  gm = gen_mask[:, 1:]
  body_exact = jnp.all(jnp.where(gm, pred, True), -1)
  return pyes, body_exact


def report(p, data, items, tag):
  ids, w, dp, gm = data
  ps, ex = [], []
  for i in range(0, len(ids), 256):
    a, b = evaluate(p, ids[i:i + 256], dp[i:i + 256], gm[i:i + 256])
    ps.append(np.asarray(a)); ex.append(np.asarray(b))
  pyes, ex = np.concatenate(ps), np.concatenate(ex)
  truth = np.array([it[3] for it in items])
  acc5 = float(((pyes > 0.5) == truth).mean())
  agree95 = float(((pyes >= 0.95) == truth).mean())
  return f"{tag}: dec acc@0.5 {acc5:.3f} agree@0.95 {agree95:.3f} reading-exact(tf) {ex.mean():.3f}"


rng = np.random.default_rng(0)
t0 = time.time()
B = 32
for it in range(1, args.steps + 1):
  idx = rng.integers(0, len(tr[0]), B)
  params, state, l = step(params, state, tr[0][idx], tr[1][idx])
  if it % 200 == 0 or it == args.steps:
    print(f"step {it} loss {float(l):.3f} {time.time() - t0:.0f}s | " + report(params, te, test_items, "heldout")
          + " | " + report(params, tuple(x[:2000] for x in tr), train_items[:2000], "train"), flush=True)

# Greedy generation of the body from the context, then P(yes) after the generated "Answer:" (end to end, text only).
n_gen = int(__import__("os").environ.get("NGEN", 300))
ans_id = tok.encode(" Answer:", add_special_tokens=False)
print("answer marker ids", ans_id)


@jax.jit
def next_tokens(p, ids, pos):
  logits = forward(p, ids)
  return jnp.argmax(jnp.take_along_axis(logits, (pos - 1)[:, None, None], 1)[:, 0], -1), \
      jax.nn.softmax(jnp.take_along_axis(logits, (pos - 1)[:, None, None], 1)[:, 0], -1)


sel = test_items[:n_gen]
ids = np.zeros((n_gen, L), np.int32)
pos = np.zeros(n_gen, np.int32)
forced = []
for i, (ctx, segs, ans, yes) in enumerate(sel):
  a = tok.encode(ctx, add_special_tokens=False)
  ids[i, :len(a)] = a
  pos[i] = len(a)
  f = []
  for k, (text, trained) in enumerate(segs):
    if not trained:
      f.append((tok.encode(segs[k - 1][0], add_special_tokens=False)[-3:], tok.encode(text, add_special_tokens=False)))
  forced.append(f)
done = np.zeros(n_gen, bool)
pyes = np.zeros(n_gen)
for t in range(L - 2):
  nt, probs = next_tokens(params, jnp.asarray(ids), jnp.asarray(pos))
  nt, probs = np.asarray(nt), np.asarray(probs)
  for i in range(n_gen):
    if done[i] or pos[i] >= L - 1:
      done[i] = True
      continue
    if list(ids[i, pos[i] - len(ans_id):pos[i]]) == ans_id:
      pyes[i] = probs[i, yes_id] / (probs[i, yes_id] + probs[i, no_id])
      done[i] = True
      continue
    ids[i, pos[i]] = nt[i]
    pos[i] += 1
    for trig, ins in forced[i]:
      if list(ids[i, pos[i] - len(trig):pos[i]]) == trig and pos[i] + len(ins) < L:
        ids[i, pos[i]:pos[i] + len(ins)] = ins
        pos[i] += len(ins)
        forced[i] = [x for x in forced[i] if x[0] != trig]
        break
  if done.all():
    break
truth = np.array([it[3] for it in sel])
gen_bodies = [tok.decode(ids[i, :pos[i]]) for i in range(n_gen)]
body_ok = np.array([g.replace(' ', '') == (it[0] + ''.join(x for x, _ in it[1])).replace(' ', '') for g, it in zip(gen_bodies, sel)])
print(f"GENERATED (n={n_gen}): acc@0.5 {((pyes > 0.5) == truth).mean():.3f} agree@0.95 {((pyes >= 0.95) == truth).mean():.3f} "
      f"yes-rate@0.95 {(pyes >= 0.95).mean():.3f} body exact {body_ok.mean():.3f}")
for g in gen_bodies[:3]:
  print("  ", g[-260:])
