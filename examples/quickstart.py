"""Quick start: the GSPN layer in a model, its gradients, and the operator it is built on.

    python examples/quickstart.py
"""

import torch

from gspn_ref import GSPNBlock, TinyGSPNClassifier, gspn_scan, gspn_scan_ref, normalize_weights

torch.manual_seed(0)

# A classifier made of GSPN blocks: (B, 3, H, W) -> (B, num_classes); H, W multiples of 8.
model = TinyGSPNClassifier(num_classes=10)
images = torch.randn(4, 3, 32, 32)
loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3]))
loss.backward()
print(f"classifier loss {loss.item():.4f}; gradient norm of the first GSPN projection "
      f"{model.stages[0][0].gspn.in_proj.weight.grad.norm():.4f}")

# A block is shape-preserving and can be dropped into any NCHW network.
block = GSPNBlock(16, chunk=4, groups=8)  # local propagation every 4 lines, 8 weight groups
print("block output", tuple(block(torch.randn(2, 16, 20, 12)).shape))

# The operator: x, lam (B, C, H, W), weights (B, G, H, W) normalized per docs/operator.md ("Weight normalization").
x, lam = torch.randn(2, 1, 6, 9, 9)
gl, gm, gr = normalize_weights(*torch.randn(3, 1, 3, 9, 9), direction="b2t")
h = gspn_scan(x, lam, gl, gm, gr, direction="b2t")
print("scan vs reference max |diff|:", (h - gspn_scan_ref(x, lam, gl, gm, gr, direction="b2t")).abs().max().item())
