"""A single-file GPT loop in nanoGPT's style, made preemptible: a loop at module level (no `with`),
the next batch fetched before the step ends, batches drawn from torch's RNG, gradient accumulation,
an eval every few steps, and its own `ckpt.pt` for sampling. The lines marked `# preemptible` are
all it takes; the rest is the plain loop.

    torchrun --standalone --nproc_per_node=2 examples/nanogpt.py runs/nanogpt   # DDP (CPU: gloo)
    python examples/nanogpt.py runs/nanogpt --max_iters=100                     # one process

TERM, Ctrl-C, a time limit or a notice: every rank stops at the same step, saves, exits 143/130/...;
the same command resumes bit-identically. SIGKILL: the same command resumes from the last
periodic checkpoint (`--interval`).
"""

import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import preemptible  # preemptible

# -- configuration: nanoGPT's globals, overridden by --key=value --------------------------------
out_dir = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "runs/nanogpt"
max_iters, eval_interval, eval_iters, interval = 60, 10, 4, 20
batch_size, block_size, gradient_accumulation_steps = 4, 32, 2
n_layer, n_head, n_embd, dropout = 2, 2, 32, 0.1
learning_rate, warmup_iters, min_lr = 1e-3, 10, 1e-4
step_seconds = 0.0  # a pause per step (the tests aim their signals with it)
for arg in sys.argv[1:]:
    if arg.startswith("--"):
        key, value = arg[2:].split("=", 1)
        globals()[key] = type(globals()[key])(value)

# -- distributed, seeds, data ---------------------------------------------------------------
env = preemptible.init_distributed()  # preemptible: torchrun's variables, or one process
master_process = env.rank == 0
torch.manual_seed(1337 + env.rank)
text = b"".join(open(os.path.join(os.path.dirname(os.__file__), f), "rb").read() for f in ("os.py", "random.py"))
data = torch.tensor(list(text), dtype=torch.long)
n = int(0.9 * len(data))
splits = {"train": data[:n], "val": data[n:]}


def get_batch(split):
    d = splits[split]
    ix = torch.randint(len(d) - block_size, (batch_size,))
    x = torch.stack([d[i:i + block_size] for i in ix])
    y = torch.stack([d[i + 1:i + 1 + block_size] for i in ix])
    return x.to(env.device), y.to(env.device)


def train_batches():  # preemptible: get_batch as an iterator (its only state is torch's RNG)
    while True:
        yield get_batch("train")


# -- the model ----------------------------------------------------------------------------
class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(256, n_embd), nn.Embedding(block_size, n_embd)
        layer = nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.head = nn.Linear(n_embd, 256, bias=False)

    def forward(self, idx, targets):
        t = idx.size(1)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        h = self.blocks(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)), mask=mask, is_causal=True)
        return F.cross_entropy(self.head(h).view(-1, 256), targets.view(-1))


torch.manual_seed(1337)  # the same initial weights on every rank
model = GPT().to(env.device)
torch.manual_seed(1337 + env.rank)
raw_model = model
if env.world_size > 1:
    model = DDP(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1)


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    ratio = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss():
    model.eval()
    losses = {split: torch.stack([raw_model(*get_batch(split)) for _ in range(eval_iters)]).mean().item()
              for split in ("train", "val")}
    model.train()
    return losses


# -- the loop -------------------------------------------------------------------------------
run = preemptible.Run(out_dir, model=model, optimizer=optimizer, data=train_batches(),  # preemptible
                      values={"best_val_loss": 1e9}, max_steps=max_iters,  # preemptible
                      checkpoint=preemptible.Checkpointer(interval=interval))  # preemptible
run.start()  # preemptible: owns out_dir, installs the signals, resumes where the last run stopped
train = run.batches(ahead=1)  # preemptible: the loop fetches the next step's batch before the step ends
X, Y = next(train)
while run.step < max_iters and not run.stopping:  # preemptible: iter_num is run.step
    lr = get_lr(run.step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if run.step % eval_interval == 0 and master_process:
        losses = estimate_loss()
        run.event("eval", train_loss=losses["train"], val_loss=losses["val"])  # preemptible (optional)
        if losses["val"] < run.values["best_val_loss"]:
            run.values["best_val_loss"] = losses["val"]  # preemptible: saved and restored with the run
            torch.save({"model": raw_model.state_dict(), "iter_num": run.step, "best_val_loss": losses["val"]},
                       os.path.join(out_dir, "ckpt.pt"))  # the loop's own file for sampling
    for micro_step in range(gradient_accumulation_steps):
        if env.world_size > 1:
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        loss = model(X, Y) / gradient_accumulation_steps
        X, Y = next(train)  # fetch the next batch while the device would still be busy
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    time.sleep(step_seconds)
    run.step_done(loss=loss * gradient_accumulation_steps)  # preemptible: counts the step, saves, agrees on a stop
run.exit()  # preemptible: the last save, then every rank exits with the run's status (0, 143, 130, ...)
