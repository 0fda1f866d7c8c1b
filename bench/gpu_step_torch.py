"""PyTorch's counterpart of Zenith's fused GPU step: clip_grad_norm_ (the
global norm pass) and an SGD momentum step with weight decay, on one flat
parameter of N floats on the GPU. Prints the mean time of one step.

    /usr/bin/python3 bench/gpu_step_torch.py [N]
"""
import sys
import torch

n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000_000
p = torch.nn.Parameter(torch.zeros(n, device="cuda"))
p.grad = torch.zeros(n, device="cuda")
opt = torch.optim.SGD([p], lr=0.05, momentum=0.9, weight_decay=5e-4)


def step():
    torch.nn.utils.clip_grad_norm_([p], max_norm=1e9)
    opt.step()


for _ in range(3):
    step()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
reps = 20
start.record()
for _ in range(reps):
    step()
end.record()
torch.cuda.synchronize()
print("torch_step_ms %.3f n %d torch %s" % (start.elapsed_time(end) / reps, n, torch.__version__))
