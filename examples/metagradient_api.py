"""Exact metagradients from Python: per-step learning rates and per-example data weights.

Run: ``python examples/metagradient_api.py`` (a few seconds on a laptop CPU).
"""

import torch

import mgd
from mgd.data import load_dataset
from mgd.models import build_model

torch.set_num_threads(1)  # replays must run with the thread count of the forward pass

data = load_dataset("digits")  # bundled with scikit-learn: no download
dtype = torch.float64
model = build_model("mlp", data.input_shape, data.num_classes, seed=0, dtype=dtype)
trainer = mgd.Trainer(
    model,
    mgd.SGD(momentum=0.9),
    torch.as_tensor(data.x_train, dtype=dtype),
    torch.as_tensor(data.y_train),
    steps=200,
    batch_size=100,
    lr=0.05,
    metaparams=["lr", "data_weights"],  # η_t = 0.05·z_t; loss = mean of w_i·CE_i
)
objective = mgd.cross_entropy_objective(  # φ(θ_T): validation cross-entropy
    model, torch.as_tensor(data.x_val, dtype=dtype), torch.as_tensor(data.y_val)
)

result = mgd.metagradient(trainer, objective)  # REPLAY, k = ceil(sqrt(T)) = 15
print(f"val loss {result.value:.4f}; plan: {result.plan}")
print("dL/d lr[t], first 5 steps:", result.grads["lr"][:5].tolist())
worst = result.grads["data_weights"].topk(5).indices.tolist()
print("training examples whose upweighting hurts validation most:", worst)

# Check it against the plain full unroll (stores the whole graph) and finite differences.
_, reference = mgd.full_unroll_metagradient(trainer, objective)
print("relative error vs full unroll:", mgd.check.relative_error(result.grads["lr"], reference["lr"]))
direction = torch.randn(trainer.steps, dtype=dtype, generator=torch.Generator().manual_seed(0))
direction /= direction.norm()
fd = mgd.directional_finite_difference(trainer, objective, {}, {"lr": direction}, h=1e-5)
exact = (result.grads["lr"] * direction).sum().item()
print(f"along a random direction: finite differences {fd:.10e}, metagradient {exact:.10e}")
